"""The errors the acceleration layers raise for an option that cannot work as asked (one line in
the CLIs, exit code 2). Its own module so that accel and fp8 (whose Fp8Error is one) both import
it without importing each other. They name the options they refuse as `wan.naming.Arg`s: said
`name=value` by the Python API, as flags by the CLIs (wan_triton.flag_words)."""
from wan.naming import NamedError


class AccelError(NamedError):
    """An option that cannot work on this machine (e.g. a CUDA-only option without CUDA)."""


class PlanError(AccelError):
    """Options that cannot work together or here (a row of wan_triton.plan.RULES), in API words."""
