#define _GNU_SOURCE
#include "CStokerSystem.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

extern char **environ;

int stoker_spawn_file_actions_addclosefrom(posix_spawn_file_actions_t *actions, int lowfd) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
    return posix_spawn_file_actions_addclosefrom_np(actions, lowfd);
#else
    (void)actions;
    (void)lowfd;
    return ENOSYS;
#endif
}

int stoker_spawn_file_actions_addchdir(posix_spawn_file_actions_t *actions, const char *path) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 29))
    return posix_spawn_file_actions_addchdir_np(actions, path);
#elif defined(__APPLE__)
    return posix_spawn_file_actions_addchdir_np(actions, path);
#else
    (void)actions;
    (void)path;
    return ENOSYS;
#endif
}

char *const *stoker_environ(void) {
    return environ;
}

int stoker_pipe_cloexec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC);
}
