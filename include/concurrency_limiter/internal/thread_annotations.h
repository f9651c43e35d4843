// Clang thread-safety annotations (-Wthread-safety), as Abseil spells them,
// with a CL_ prefix so they cannot clash with a user's own macros.
//
// They let the compiler check what the comments used to only say: which
// mutex guards a field (CL_GUARDED_BY), which functions must be called with
// it held (CL_REQUIRES) or without it (CL_EXCLUDES), and which functions take
// or drop it (CL_ACQUIRE, CL_RELEASE). Other compilers see nothing. `make
// thread-safety` builds the library and its tests with clang++ -Wthread-safety
// -Werror.
//
// Internal: not part of the library's API.
#pragma once

#if defined(__clang__)
#define CL_THREAD_ANNOTATION(x) __attribute__((x))
#else
#define CL_THREAD_ANNOTATION(x)
#endif

#define CL_CAPABILITY(x) CL_THREAD_ANNOTATION(capability(x))
#define CL_SCOPED_CAPABILITY CL_THREAD_ANNOTATION(scoped_lockable)
#define CL_GUARDED_BY(x) CL_THREAD_ANNOTATION(guarded_by(x))
#define CL_PT_GUARDED_BY(x) CL_THREAD_ANNOTATION(pt_guarded_by(x))
#define CL_ACQUIRED_BEFORE(...) CL_THREAD_ANNOTATION(acquired_before(__VA_ARGS__))
#define CL_ACQUIRED_AFTER(...) CL_THREAD_ANNOTATION(acquired_after(__VA_ARGS__))
#define CL_REQUIRES(...) CL_THREAD_ANNOTATION(requires_capability(__VA_ARGS__))
#define CL_ACQUIRE(...) CL_THREAD_ANNOTATION(acquire_capability(__VA_ARGS__))
#define CL_RELEASE(...) CL_THREAD_ANNOTATION(release_capability(__VA_ARGS__))
#define CL_TRY_ACQUIRE(...) CL_THREAD_ANNOTATION(try_acquire_capability(__VA_ARGS__))
#define CL_EXCLUDES(...) CL_THREAD_ANNOTATION(locks_excluded(__VA_ARGS__))
#define CL_RETURN_CAPABILITY(x) CL_THREAD_ANNOTATION(lock_returned(x))
#define CL_NO_THREAD_SAFETY_ANALYSIS CL_THREAD_ANNOTATION(no_thread_safety_analysis)
