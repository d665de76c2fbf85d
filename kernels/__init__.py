"""Fast paths of `dagman_fast`, each beside its PyTorch reference; installed as `dagman_fast.kernels`.

One module per op (`window_attention`, ...). Nothing here imports fastai, so the kernels can be tested and
benchmarked on their own.
"""
