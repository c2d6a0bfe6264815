"""One model client for every program that uses a model: in-process (LocalClient) or any OpenAI-compatible
endpoint (EndpointClient), with the same command-line flags everywhere."""

from __future__ import annotations

from pathlib import Path

from llmlab.client.base import GenParams, Generation, LogLik, ModelClient
from llmlab.client.endpoint import EndpointClient
from llmlab.client.lite import LiteClient
from llmlab.client.local import LocalClient
from llmlab.errors import LLMLabError

__all__ = ["EndpointClient", "GenParams", "Generation", "LiteClient", "LocalClient", "LogLik", "ModelClient", "add_client_args",
           "add_context_args", "as_client", "client_from_args", "connect"]


def connect(model: str | None = None, endpoint: str | None = None, api_key: str | None = None,
            endpoint_model: str = "default", logprobs: bool = True, **load_options) -> ModelClient:
    """A client for an llmlab model (registry name, checkpoint directory, .gguf) or an endpoint URL.

    load_options (dtype, int4, compile, exact, rope_scaling, self_extend) go to llmlab.load and only make sense in-process: given with an
    endpoint they are refused rather than ignored."""
    if model and endpoint:
        raise LLMLabError("give a model or an endpoint, not both")
    if endpoint:
        given = [k for k, v in load_options.items() if v not in (None, False)]
        if given:
            raise LLMLabError(f"--{given[0].replace('_', '-')} applies to an in-process model, not to an endpoint")
        return EndpointClient(endpoint, endpoint_model, api_key, logprobs=logprobs)
    if api_key:
        raise LLMLabError("--api-key applies to an endpoint; give --endpoint URL")
    from llmlab.api import load
    return LocalClient(load(model or "smollm2", **{k: v for k, v in load_options.items() if v is not None}))


def as_client(x) -> ModelClient:
    """Accept a client, an llmlab LLM, or a model name."""
    if hasattr(x, "loglikelihood") and hasattr(x, "complete") and hasattr(x, "count_tokens"):
        return x
    if hasattr(x, "engine"):
        return LocalClient(x)
    if isinstance(x, (str, Path)):
        return connect(model=str(x))
    raise LLMLabError(f"cannot use a {type(x).__name__} as a model: give a client, an llmlab LLM or a model name")


def add_client_args(p, prefix: str = "", in_process: bool = True):
    """The flags of every command that uses a model: `--model NAME|PATH` or `--endpoint URL [--api-key KEY]`.
    prefix="judge" gives --judge-model, --judge-endpoint, ... for a second model in one command."""
    dash = f"--{prefix}-" if prefix else "--"
    dest = (lambda k: f"{prefix}_{k}") if prefix else (lambda k: k)
    what = "the judge" if prefix == "judge" else "the model"
    p.add_argument(f"{dash}model", *(["-m"] if not prefix else []), dest=dest("model"), default=None,
                   help=f"{what}: llmlab registry name, checkpoint directory or .gguf (default smollm2)")
    p.add_argument(f"{dash}endpoint", dest=dest("endpoint"), default=None,
                   help=f"{what} behind an OpenAI-compatible endpoint (llmlab serve, vLLM, llama-server), "
                        "e.g. http://127.0.0.1:8000/v1")
    p.add_argument(f"{dash}endpoint-model", dest=dest("endpoint_model"), default="default",
                   help="the model name to send to the endpoint")
    p.add_argument(f"{dash}api-key", dest=dest("api_key"), default=None, help="the endpoint's API key")
    if in_process and not prefix:
        p.add_argument("--dtype", default=None, help="in-process: float32 | bfloat16")
        p.add_argument("--compile", action="store_true", help="in-process: torch.compile the decode step")
        p.add_argument("--int4", action="store_true", help="in-process: decode with 4-bit weight copies")
        p.add_argument("--exact", action="store_true", help="in-process: fp32 eager decoding (parity work)")
        add_context_args(p)


def add_context_args(p):
    """--rope-scaling and --self-extend: an in-process model's context stretched past its checkpoint's."""
    p.add_argument("--rope-scaling", default=None, metavar="KIND:FACTOR",
                   help="in-process: stretch the context by RoPE scaling, KIND linear|ntk|yarn (e.g. yarn:4)")
    p.add_argument("--self-extend", default=None, metavar="GROUP,WINDOW",
                   help="in-process: Self-Extend grouped attention past the trained context (e.g. 4,1024)")


def client_from_args(args, prefix: str = "", logprobs: bool = True) -> ModelClient:
    g = (lambda k: getattr(args, f"{prefix}_{k}", None)) if prefix else (lambda k: getattr(args, k, None))
    return connect(model=g("model"), endpoint=g("endpoint"), api_key=g("api_key"),
                   endpoint_model=g("endpoint_model") or "default", logprobs=logprobs,
                   **({} if prefix else {"dtype": g("dtype"), "compile": g("compile"), "int4": g("int4"),
                                      "exact": g("exact"), "rope_scaling": g("rope_scaling"),
                                      "self_extend": g("self_extend")}))
