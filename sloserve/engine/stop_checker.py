"""Stop conditions, token by token: stop token ids, EOS, stop strings (on the detokenized text), lengths."""
from __future__ import annotations

from sloserve.engine.detokenizer import Detokenizer
from sloserve.request import Request, RequestStatus


def check_stop(request: Request, token: int, num_outputs: int, detokenizer: Detokenizer | None,
               max_model_len: int) -> RequestStatus | None:
    """Whether `token`, the request's `num_outputs`-th output, ends it; its text grows by the token's delta."""
    params = request.sampling_params
    # vLLM's min_tokens: no stop token or string before that many tokens (the sampler masks EOS and
    # stop_token_ids meanwhile; this also covers executors that do not sample, like the simulator).
    if num_outputs >= params.min_tokens:
        if token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if not params.ignore_eos and token in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
    if detokenizer is not None:
        delta = detokenizer.add(token)
        request.output_text += delta
        if delta and num_outputs > params.min_tokens and cut_at_stop_string(request, len(delta)):
            return RequestStatus.FINISHED_STOPPED
    if num_outputs >= params.max_tokens or request.num_prompt_tokens + num_outputs >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


def cut_at_stop_string(request: Request, delta_len: int) -> bool:
    """Truncate the text at the first stop string that the new text completed (before it, or
    after it with include_stop_str_in_output)."""
    text = request.output_text
    for stop in request.sampling_params.stop:
        # Only a match ending inside the new text is new; look back far enough to see it start.
        i = text.find(stop, max(0, len(text) - delta_len - len(stop) + 1))
        if i != -1:
            keep = len(stop) if request.sampling_params.include_stop_str_in_output else 0
            request.output_text = text[: i + keep]
            request.stop_reason = stop
            return True
    return False
