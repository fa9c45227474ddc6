"""`serve --enable-log-requests`: one INFO line per request with its id, prompt and
parameters, as vLLM's RequestLogger writes it (cut to --max-log-len characters / token ids)."""

from __future__ import annotations

import logging

from pagedllm.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RequestLogger:
    def __init__(self, max_log_len: int | None = None) -> None:
        if max_log_len is not None and max_log_len < 0:
            raise ValueError(f"--max-log-len must be >= 0 or left out (no limit), got {max_log_len}.")
        self.max_log_len = max_log_len

    def log_inputs(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                   params: SamplingParams) -> None:
        if self.max_log_len is not None:
            prompt = None if prompt is None else prompt[: self.max_log_len]
            prompt_token_ids = None if prompt_token_ids is None else prompt_token_ids[: self.max_log_len]
        logger.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s.",
                    request_id, prompt, params, prompt_token_ids)
