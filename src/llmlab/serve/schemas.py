"""The OpenAI-compatible request and response bodies, as pydantic models (they are also the OpenAPI schema).

Requests are strict: a value of the wrong JSON type is refused (`"max_tokens": "10"` is not 10, `true` is not 1),
as the OpenAI API does, and a field the server does not implement is refused with a 400 naming it rather than
silently ignored. A few OpenAI fields are accepted and ignored because ignoring them changes no answer:
- `user`: an end-user id OpenAI keeps for abuse monitoring; nothing here depends on it.
- a tool's `function.strict` (the arguments' schema is always enforced).
- `presence_penalty`, `frequency_penalty`: only 0 (OpenAI's default, which is what this server does) is accepted.
- `response_format.json_schema.description` (guidance for the model; the schema itself is enforced) and
  `.strict` (the schema is always enforced exactly).
`top_k`, `min_p` and `repetition_penalty` are accepted as vLLM does (they are not OpenAI fields).
A field left out takes the model's default (its generation_config.json), then llmlab's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# fields that are refused with a reason of their own, not "unknown field"
UNSUPPORTED = {
    "functions": "the deprecated functions API is not implemented; use tools",
    "function_call": "the deprecated functions API is not implemented; use tool_choice",
    "logit_bias": "logit_bias is not implemented",
    "best_of": "best_of is not implemented; ask for n completions instead",
    "suffix": "suffix (insertion) is not implemented",
    "audio": "audio is not supported", "modalities": "only text is supported",
}


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Request):
    type: Literal["text"]
    text: str


class FunctionCall(Request):
    name: str = Field(max_length=64)
    arguments: str = Field(default="{}", max_length=1_000_000)  # JSON text, as OpenAI


class ToolCall(Request):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = Field(default=None, max_length=256)  # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class JsonSchemaSpec(Request):
    name: str = Field(default="schema", max_length=256)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = Field(default=None, max_length=10_000)  # ignored: guidance for the model
    strict: bool | None = None  # ignored: the schema is always enforced


class ResponseFormat(Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class FunctionDef(Request):
    name: str = Field(max_length=64)
    description: str | None = Field(default=None, max_length=100_000)
    parameters: dict[str, Any] | None = None  # a JSON Schema; the arguments are decoded under it
    strict: bool | None = None  # ignored: the schema is always enforced


class Tool(Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Request):
    name: str = Field(max_length=64)


class NamedToolChoice(Request):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Request):
    include_usage: bool = False


MAX_N = 16  # also capped by the server's batch size (the OpenAPI schema states the smaller)
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_TOP_LOGPROBS = 20  # as OpenAI (chat); completions allow at most 5 there, more here
MAX_TOKENS = 10_000_000  # also capped by the server's context length (the OpenAPI schema states it)
Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)] | None


class SamplingFields(Request):
    model: str = Field(max_length=512)
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000, description="vLLM's extension; 0 is off")
    min_p: float | None = Field(default=None, ge=0, lt=1, description="vLLM's extension; 0 is off")
    repetition_penalty: float | None = Field(default=None, gt=0, le=100, description="vLLM's extension; 1 is off")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, description="only 0 is implemented")
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, description="only 0 is implemented")
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Stop = Field(default=None, description=f"at most {MAX_STOP} strings")
    seed: int | None = Field(default=None, ge=-(2 ** 63), lt=2 ** 63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=512, description="ignored (OpenAI's abuse-monitoring id)")


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    max_tokens: int | None = Field(default=16, ge=0, le=MAX_TOKENS)


# ---- responses ------------------------------------------------------------------------------------------------


class SpeculativeUsage(BaseModel):
    """How the drafts did (`llmlab serve --speculate`; absent for requests decoded without drafts)."""
    drafted_tokens: int
    accepted_tokens: int
    acceptance_rate: float
    verify_steps: int
    tokens_per_step: float
    turned_off: bool  # drafting stopped for the rest of the request: measured slower than plain decoding


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    speculative: SpeculativeUsage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmlab"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: dict[str, str]  # name, arguments (JSON text)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Health(BaseModel):
    status: str
    model: str
    busy_rows: int
    queue_depth: int


class FeedbackIn(Request):
    """A thumbs up/down from the web chat, with the conversation it refers to."""
    conversation_id: str = Field(min_length=1, max_length=128)
    answer_id: str = Field(min_length=1, max_length=128)
    messages: list[Message] = Field(min_length=1)  # the conversation up to (not including) the answer
    answer: str = Field(max_length=200_000)
    rating: Literal[-1, 1]
    comment: str | None = Field(default=None, max_length=10_000)
    replaces: str | None = Field(default=None, max_length=128)  # answer_id this one regenerated

    @field_validator("rating", mode="before")
    @classmethod
    def not_a_bool(cls, value):
        if isinstance(value, bool):  # Literal[-1, 1] alone takes true as 1
            raise ValueError("rating must be the integer -1 or 1, not a boolean")
        return value


class FeedbackOut(BaseModel):
    id: int
    stored: bool = True


class TokenizeIn(Request):
    prompt: str = Field(max_length=1_000_000)
    add_special_tokens: bool = False


class DetokenizeIn(Request):
    tokens: list[int] = Field(max_length=1_000_000)
