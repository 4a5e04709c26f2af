"""lightfunc.kernels: Triton kernels registered as torch custom ops, each beside its
pure-torch reference. The sources live in the repository's top-level `kernels/`
folder and are installed as `lightfunc.kernels`. No kernels have landed yet.
"""

__all__: list[str] = []
