"""The request bodies of `palm serve`, as exact as this server's settings allow.

They are the OpenAPI spec that clients and the fuzz test read: a value the schema allows is
answered, a value it forbids is refused with a 400 naming the field. Numbers and flags are
strict (JSON `true` is not the number 1, `"2"` is not 2). Fields of the OpenAI API this server
does not act on are refused when they would change the answer (`tools`, a `response_format`
other than text, `best_of` above 1, a `suffix`); fields it does not know are ignored and logged,
as vLLM does. Weights are checked again by router.parse_weights, the one place weights are
validated; the schema only describes them. Model names are read when the spec is made, so a
hot swap (serve/live.py) shows in a fresh /openapi.json.
"""


from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictStr, model_validator

from palm_tasks.serve.users import ID_PATTERN, MAX_ID_CHARS

PORTFOLIO_MODEL = "palm"  # the model name that routes by weights, the user's stored weights or the default
MEMBER_PREFIX = "palm-member-"
MAX_STOP = 4  # stop strings per request, as the OpenAI API allows
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300  # entries of logit_bias, as the OpenAI API allows
USER_ID = {"pattern": f"^{ID_PATTERN.pattern}$", "minLength": 1, "maxLength": MAX_ID_CHARS}



def _json_integer(value):
    if isinstance(value, (bool, str)):  # pydantic would read true as 1 and "2" as 2
        raise ValueError("Input should be a valid integer")
    return value


def below(n: int) -> str:
    """A regular expression of the decimal numbers 0 .. n - 1 (no leading zeros): the token ids
    of a vocabulary of n, as logit_bias writes them (object keys are strings)."""
    top = str(n - 1)
    parts = ["0"] + [f"[1-9][0-9]{{{k}}}" for k in range(len(top) - 1)]  # fewer digits than n - 1
    for i, digit in enumerate(top):  # as many digits: below n - 1 at position i, equal before it
        low = "1" if i == 0 else "0"
        if int(digit) > int(low):
            parts.append(f"{top[:i]}[{low}-{int(digit) - 1}][0-9]{{{len(top) - i - 1}}}")
    parts.append(top)
    return "^(" + "|".join(dict.fromkeys(parts)) + ")$"


def integer(**bounds):
    """A JSON integer (2 or 2.0, never "2" or true) within `bounds` (ge, le, ...)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_json_integer)]


def number(**bounds):
    """A JSON number (an integer too, never a string or a boolean) within `bounds`."""
    return Annotated[StrictFloat, Field(**bounds)]


def request_models(traits: list[str], model_names: Callable[[], list[str]], cfg, vocab_size: int):
    """(ChatRequest, CompletionRequest, RouteRequest, PreferencesRequest) for a portfolio with
    these traits and model names, under `cfg` (config.ServeConfig)."""
    weights_schema = {
        "type": "object", "additionalProperties": False, "required": list(traits),
        "properties": {t: {"type": "number", "minimum": 0} for t in traits},
        "anyOf": [{"properties": {t: {"exclusiveMinimum": 0}}} for t in traits],  # not all zero
    }
    weights_help = ("the user's weight on each trait, every trait once, >= 0 and not all zero; "
                    "normalized when they do not sum to 1")
    Weights = Annotated[dict[str, StrictFloat], Field(description=weights_help, json_schema_extra=weights_schema)]
    Stop = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]
    TokenId = integer(ge=0, lt=vocab_size)

    class PalmOptions(BaseModel):
        """PALM's extension of a request (the OpenAI client's extra_body={"palm": ...})."""
        model_config = ConfigDict(extra="forbid")
        weights: Weights

    class StreamOptions(BaseModel):
        include_usage: StrictBool = False

    class ResponseFormat(BaseModel):
        type: Literal["text"] = Field(description="text only: this server does not constrain its answers")

    class Sampled(BaseModel):
        """What chat and completion requests share."""
        # unknown fields: ignored and logged; Python's regular expressions (the user id's look-ahead)
        model_config = ConfigDict(extra="allow", regex_engine="python-re")
        model: StrictStr = Field(
            description=f'"{PORTFOLIO_MODEL}" (routed by palm.weights, else by the stored weights of `user`, '
                        'else the default route) or a member\'s name',
            json_schema_extra=lambda schema: schema.update(enum=model_names()))
        temperature: number(ge=0, le=2) | None = Field(
            None, description="0: greedy; absent: the member's temperature (its values and guarantee were "
                              "measured at it; palm.temperature in the answer)")
        top_p: number(gt=0, le=1) | None = Field(None)
        seed: integer(ge=0, le=2**63 - 1) | None = Field(None, description="the same seed, the same answers")
        n: integer(ge=1, le=cfg.max_n) | None = Field(None, description="answers per prompt")
        stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = Field(
            None, description="the answer ends before the first of these strings")
        stream: StrictBool = False
        stream_options: StreamOptions | None = None
        user: Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS,
                                         pattern=USER_ID["pattern"])] | None = Field(
            None, description="routes by this user's stored weights (PUT /v1/users/{user}/preferences)")
        presence_penalty: number(ge=-2, le=2) | None = Field(None)
        frequency_penalty: number(ge=-2, le=2) | None = Field(None)
        logit_bias: Annotated[dict[Annotated[str, Field(pattern=below(vocab_size))],
                                   number(ge=-100, le=100)],
                              Field(max_length=MAX_LOGIT_BIAS, json_schema_extra={"additionalProperties": False})] \
            | None = Field(
            None, description="token id (a string) -> a bias added to its logit")
        response_format: ResponseFormat | None = None
        tools: Annotated[list[Any], Field(max_length=0)] | None = Field(
            None, description="not supported: this server does not call tools")
        tool_choice: Literal["none"] | None = None
        palm: PalmOptions | None = None

    class ContentPart(BaseModel):
        type: Literal["text"]
        text: StrictStr

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "developer", "user", "assistant"]
        content: StrictStr | list[ContentPart]

    class ChatRequest(Sampled):
        """The OpenAI chat completion request."""
        model_config = ConfigDict(extra="allow", regex_engine="python-re", json_schema_extra={
            "if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
            "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}})
        messages: list[Message] = Field(min_length=1)
        max_tokens: integer(ge=1, le=cfg.max_tokens) | None = Field(None)
        max_completion_tokens: integer(ge=1, le=cfg.max_tokens) | None = Field(None,
                                                        description="the newer name of max_tokens")
        logprobs: StrictBool | None = Field(None, description="each answer token's log-probability")
        top_logprobs: integer(ge=0, le=cfg.max_logprobs) | None = Field(None,
                                               description="and this many most likely tokens (needs logprobs)")

        @model_validator(mode="after")
        def _top_needs_logprobs(self):
            if self.top_logprobs is not None and not self.logprobs:
                raise ValueError("top_logprobs: needs logprobs: true")
            return self

    Prompts = (Annotated[StrictStr, Field(min_length=1)] | Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1,
                                                                                            max_length=cfg.max_n)]
               | Annotated[list[TokenId], Field(min_length=1)]
               | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1,
                                                                                        max_length=cfg.max_n)])

    class CompletionRequest(Sampled):
        """The OpenAI (legacy) completion request."""
        model_config = ConfigDict(extra="allow", regex_engine="python-re", json_schema_extra={
            "if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
            "then": {"required": ["echo"], "properties": {"echo": {"const": True}}}})
        prompt: Prompts = Field(description="a string, a list of strings, token ids, or a list of token-id lists")
        max_tokens: integer(ge=0, le=cfg.max_tokens) | None = Field(None,
                                             description="0 (with echo): the prompt's log-probabilities only")
        echo: StrictBool = Field(False, description="the prompt before the answer (with logprobs: its tokens' too)")
        logprobs: integer(ge=0, le=cfg.max_logprobs) | None = Field(None,
                                           description="each token's log-probability and this many most likely")
        best_of: Literal[1] | None = Field(None, description="1 only: every answer drawn is returned")
        suffix: None = Field(None, description="not supported")

        @model_validator(mode="after")
        def _zero_tokens_only_to_echo(self):
            if self.max_tokens == 0 and not self.echo:
                raise ValueError("max_tokens: 0 only with echo (the prompt's log-probabilities); otherwise >= 1")
            return self

        @property
        def prompt_list(self) -> list:
            p = self.prompt
            if isinstance(p, str) or (p and isinstance(p[0], int)):
                return [p]
            return list(p)

    class RouteRequest(BaseModel):
        weights: Weights

    class PreferencesRequest(BaseModel):
        """A user's trait weights, stored for their later requests."""
        model_config = ConfigDict(extra="forbid")
        weights: Weights

    return ChatRequest, CompletionRequest, RouteRequest, PreferencesRequest


def ignored_fields(body: BaseModel) -> list[str]:
    """The fields of a request that this server does not know (it ignores them; vLLM does too)."""
    return sorted(body.model_extra or {})
