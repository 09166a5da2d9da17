// Shared by vig_pyg's compiled kernels.
#pragma once

// Loops marked VIG_PYG_CLONES are compiled twice on x86-64 with GCC, for AVX2 and for the baseline, and
// the loader picks one for the running CPU (the channel and score loops measured 1.3x-1.6x faster with
// AVX2 here, and a build must still run on any x86-64). Elsewhere: baseline only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VIG_PYG_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VIG_PYG_CLONES
#endif
