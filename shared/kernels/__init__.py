"""GPU kernels that model code (shared/models) dispatches to. They live under shared/ because shared
code must not import a process's package; only a GPU worker ever reaches them (layers._use_kernel),
so CPU workers still never load Triton."""
