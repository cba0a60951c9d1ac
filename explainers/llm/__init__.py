"""The LLM side of the explainers: an OpenAI-compatible client with a SQLite cache (``client``, ``cache``),
every prompt format (``prompts``), the LLM explainer (``explainer``), the records they exchange
(``records``) and the local vLLM server (``server``)."""

from explainers.llm.cache import LLMCache, default_cache_path
from explainers.llm.client import LLMClient, LLMConfig, LLMReply, LLMRequestError, LLMUnavailableError
from explainers.llm.explainer import LLMExplainer
from explainers.llm.records import ActivationRecord, Explanation

__all__ = ["ActivationRecord", "Explanation", "LLMCache", "LLMClient", "LLMConfig", "LLMExplainer", "LLMReply",
           "LLMRequestError", "LLMUnavailableError", "default_cache_path"]
