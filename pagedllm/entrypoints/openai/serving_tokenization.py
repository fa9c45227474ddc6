"""vLLM's /tokenize and /detokenize: the server's tokenizer, and its chat template for messages."""

from __future__ import annotations

from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_engine import RequestError


class OpenAIServingTokenization:
    def __init__(self, chat: OpenAIServingChat) -> None:
        self.chat = chat

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        chat = self.chat
        chat.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise RequestError("Give either prompt or messages.", param="prompt")
        if request.prompt is not None:
            add_special_tokens = True if request.add_special_tokens is None else request.add_special_tokens
            token_ids = chat.encode(request.prompt, add_special_tokens)
        else:
            templated = ChatCompletionRequest(
                messages=request.messages, add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message, chat_template=request.chat_template,
                chat_template_kwargs=request.chat_template_kwargs, add_special_tokens=bool(request.add_special_tokens),
            )
            token_ids, _, _ = chat.apply_chat_template(templated)
        token_strs = None
        if request.return_token_strs:
            token_strs = chat.tokenizer.convert_ids_to_tokens(token_ids)
        return TokenizeResponse(count=len(token_ids), max_model_len=chat.max_model_len, tokens=token_ids,
                                token_strs=token_strs)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        chat = self.chat
        chat.check_model(request.model)
        if chat.tokenizer is None:
            raise RequestError("The server runs with --skip-tokenizer-init: it has no tokenizer.", param="tokens")
        vocab_size = chat.engine.model_config.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"Token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1}).", param="tokens")
        return DetokenizeResponse(prompt=chat.tokenizer.decode(request.tokens))
