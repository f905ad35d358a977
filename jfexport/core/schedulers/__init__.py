"""The two sampling algorithms of JanusFlow, each in one place, free of model code.

`flow_euler`: the rectified-flow Euler loop with classifier-free guidance (text-to-image).
`decoding`: next-token choice and the stopping rule (understanding).
The reference pipelines, the runtime's scheduler and the fast GPU paths all step through these,
and serving imports them without importing any model (they need only torch).
"""

from jfexport.core.schedulers.decoding import (
                                               FinishReason,
                                               StopRule,
                                               TokenLogprobs,
                                               answers_from_stream,
                                               choose_next,
                                               decode_loop,
                                               row_generators,
                                               row_uniforms,
                                               sample_next,
                                               sample_next_device,
                                               sample_rows,
                                               stop_rows,
                                               token_logprobs,
)
from jfexport.core.schedulers.flow_euler import (
                                               FlowEulerCFGScheduler,
                                               cfg_velocity,
                                               clean_estimate,
                                               euler_schedule,
                                               euler_step,
                                               preview_steps,
)

__all__ = [
    "FinishReason", "FlowEulerCFGScheduler", "StopRule", "TokenLogprobs", "answers_from_stream", "cfg_velocity", "choose_next",
    "clean_estimate", "decode_loop", "euler_schedule", "euler_step", "preview_steps", "row_generators", "row_uniforms",
    "sample_next", "sample_next_device", "sample_rows", "stop_rows", "token_logprobs",
]
