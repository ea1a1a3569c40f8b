#ifndef STOKER_CSTOKERSYSTEM_H
#define STOKER_CSTOKERSYSTEM_H

/* C helpers for what Swift's Glibc module does not export.
 * The GNU posix_spawn extensions are declared only under _GNU_SOURCE, which the Glibc module
 * is not built with, so they are wrapped here (the .c file defines _GNU_SOURCE). */

#include <spawn.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* posix_spawn_file_actions_addclosefrom_np: close every fd >= lowfd in the child.
 * Returns 0 or an errno value (ENOSYS where the platform lacks it). */
int stoker_spawn_file_actions_addclosefrom(posix_spawn_file_actions_t *actions, int lowfd);

/* posix_spawn_file_actions_addchdir_np: chdir(path) in the child before exec.
 * Returns 0 or an errno value (ENOSYS where the platform lacks it). */
int stoker_spawn_file_actions_addchdir(posix_spawn_file_actions_t *actions, const char *path);

/* pipe2(fds, O_CLOEXEC): a pipe whose both ends are closed on exec, created atomically (no other thread's
 * fork/exec can inherit it in between). Returns 0, or -1 with errno set. */
int stoker_pipe_cloexec(int fds[2]);

/* The process environment (`environ`), which Swift 6 rejects as shared mutable state. */
char *const *stoker_environ(void);

/* Starts `path` (an absolute or relative path: no $PATH lookup) with `argv` and `envp` as a child of the calling
 * thread, with fork + execve, and stores its pid in `*pid`. In the child, before execve, it only makes
 * async-signal-safe calls: every signal disposition back to the default; the parent-death signal set to
 * `death_signal` (prctl PR_SET_PDEATHSIG; 0: none), then a check that the parent has not already gone (getppid
 * against the parent's pid, else _exit(127)); stdin on /dev/null; `stdout_fd` and `stderr_fd` (any descriptors,
 * close-on-exec or not) as fds 1 and 2; every other descriptor closed; an empty signal mask.
 *
 * Linux delivers the parent-death signal when the *thread* that forked exits, not the process: call this from a
 * thread that outlives the child (the one that reaps it).
 *
 * Returns 0, or an errno value: of fork, or of the step that failed in the child (reported through a close-on-exec
 * pipe; the failed child is reaped here), with `*failed_step` naming that step ("execve", "dup2", …; NULL when fork
 * itself failed). Linux only (ENOSYS elsewhere). */
int stoker_spawn_dying_with_thread(const char *path, char *const argv[], char *const envp[], int stdout_fd,
                                   int stderr_fd, int death_signal, pid_t *pid, const char **failed_step);

/* pidfd_open(pid, 0): a descriptor that polls readable once process `pid` has exited (Linux 5.3+); -1 with errno
 * set when unavailable (ENOSYS). */
int stoker_pidfd_open(pid_t pid);

/* Names the calling thread (what `top -H`, `ps -L`, gdb and perf show); Linux keeps the first 15 bytes. Returns 0
 * or an errno value; ENOSYS off Linux. */
int stoker_thread_set_name(const char *name);

#ifdef __cplusplus
}
#endif

#endif
