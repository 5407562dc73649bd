"""The errors the acceleration layers raise for an option that cannot work as asked (one line in
the CLIs, exit code 2). Its own module so that accel and fp8 (whose Fp8Error is one) both import
it without importing each other."""


class AccelError(ValueError):
    """An option that cannot work on this machine (e.g. a CUDA-only option without CUDA)."""


class PlanError(AccelError):
    """Options that cannot work together or here (wan_triton.plan's table), in API words."""
