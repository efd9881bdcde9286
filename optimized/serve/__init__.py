"""Serving the optimized path over HTTP: the checkpoint's tokenizer and chat template, an engine
thread, and a FastAPI app under uvicorn with /generate and an OpenAI-compatible subset."""

from .chat import ChatError, ChatTemplate, load_chat_template
from .http import Server, build_engine, build_server, make_server, run_until_interrupted, serve
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = ["ChatError", "ChatTemplate", "Server", "Tokenizer", "TokenizerError", "build_engine", "build_server",
           "load_chat_template", "load_tokenizer", "make_server", "run_until_interrupted", "serve"]
