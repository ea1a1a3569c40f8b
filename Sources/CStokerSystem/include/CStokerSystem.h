#ifndef STOKER_CSTOKERSYSTEM_H
#define STOKER_CSTOKERSYSTEM_H

/* C helpers for what Swift's Glibc module does not export.
 * The GNU posix_spawn extensions are declared only under _GNU_SOURCE, which the Glibc module
 * is not built with, so they are wrapped here (the .c file defines _GNU_SOURCE). */

#include <spawn.h>

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

#ifdef __cplusplus
}
#endif

#endif
