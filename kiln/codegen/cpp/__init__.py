"""codegen/cpp/: C++/OpenMP kernels for CPU tensors (build.py compiles and loads them)."""
