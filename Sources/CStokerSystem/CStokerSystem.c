#define _GNU_SOURCE
#include "CStokerSystem.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
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

#ifdef __linux__
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>

/* The steps of the child between fork and execve, for the failure report. */
static const char *const stoker_child_steps[] = {
    "prctl(PR_SET_PDEATHSIG)", "open(/dev/null)", "fcntl(F_DUPFD_CLOEXEC)", "dup2", "sigprocmask", "execve",
};

struct stoker_child_failure {
    int step;
    int error;
};

/* Child only: reports `step` and errno through the close-on-exec pipe, then exits. */
static void stoker_child_fail(int report_fd, int step) {
    struct stoker_child_failure failure = {step, errno};
    ssize_t ignored = write(report_fd, &failure, sizeof failure);
    (void)ignored;
    _exit(127);
}

/* Child only: closes every descriptor >= 3 except `keep` (close_range, else one by one up to `limit`). */
static void stoker_close_all_but(int keep, long limit) {
#ifdef SYS_close_range
    int ranged = (keep == 3 || syscall(SYS_close_range, 3U, (unsigned)keep - 1U, 0U) == 0) &&
                 syscall(SYS_close_range, (unsigned)keep + 1U, ~0U, 0U) == 0;
    if (ranged) return;
#endif
    for (long fd = 3; fd < limit; fd++) {
        if (fd != keep) close((int)fd);
    }
}

int stoker_spawn_dying_with_thread(const char *path, char *const argv[], char *const envp[], int stdout_fd,
                                   int stderr_fd, int death_signal, pid_t *pid, const char **failed_step) {
    *failed_step = NULL;
    long limit = sysconf(_SC_OPEN_MAX);
    if (limit < 0 || limit > (1L << 20)) limit = 1L << 20;
    int report[2];
    if (pipe2(report, O_CLOEXEC) != 0) return errno;

    /* Blocked in the parent thread across fork, so no handler of ours runs in the child before the reset. */
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    pid_t parent = getpid();
    pid_t child = fork();
    if (child == 0) {
        /* Async-signal-safe calls only from here on (another thread may have held a lock at fork). */
        int report_fd = fcntl(report[1], F_DUPFD_CLOEXEC, 3);
        if (report_fd < 0) _exit(127);
        struct sigaction defaults;
        memset(&defaults, 0, sizeof defaults);
        defaults.sa_handler = SIG_DFL;
        /* The kernel's struct for rt_sigaction, all zero: SIG_DFL, no flags, empty mask (whatever the layout). */
        unsigned char kernel_defaults[64];
        memset(kernel_defaults, 0, sizeof kernel_defaults);
        for (int signo = 1; signo < NSIG; signo++) {
            if (signo == SIGKILL || signo == SIGSTOP) continue;
            /* glibc refuses its reserved signals (32, 33: EINVAL), yet an ignored one stays ignored across execve:
             * reset those through the system call itself. */
            if (sigaction(signo, &defaults, NULL) != 0)
                syscall(SYS_rt_sigaction, signo, kernel_defaults, NULL, (size_t)(_NSIG / 8));
        }
        if (death_signal != 0) {
            if (prctl(PR_SET_PDEATHSIG, (unsigned long)death_signal, 0UL, 0UL, 0UL) != 0)
                stoker_child_fail(report_fd, 0);
            /* The parent may have died before prctl: then nothing would ever send the signal. */
            if (getppid() != parent) _exit(127);
        }
        int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (null_fd < 0) stoker_child_fail(report_fd, 1);
        /* Copies above 2 first, so no dup2 below overwrites a source still needed (e.g. stdout_fd == 2). */
        int out = fcntl(stdout_fd, F_DUPFD_CLOEXEC, 3);
        int err = fcntl(stderr_fd, F_DUPFD_CLOEXEC, 3);
        if (out < 0 || err < 0) stoker_child_fail(report_fd, 2);
        /* dup2 clears close-on-exec on the target. */
        if (dup2(null_fd, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0) stoker_child_fail(report_fd, 3);
        stoker_close_all_but(report_fd, limit);
        sigset_t none;
        sigemptyset(&none);
        if (sigprocmask(SIG_SETMASK, &none, NULL) != 0) stoker_child_fail(report_fd, 4);
        execve(path, argv, envp);
        stoker_child_fail(report_fd, 5);
    }
    int fork_error = errno;
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    close(report[1]);
    if (child < 0) {
        close(report[0]);
        return fork_error;
    }
    /* EOF: execve succeeded (the pipe closed on exec). A full report: the child failed and exited. */
    struct stoker_child_failure failure;
    ssize_t count;
    do {
        count = read(report[0], &failure, sizeof failure);
    } while (count < 0 && errno == EINTR);
    close(report[0]);
    if (count == (ssize_t)sizeof failure) {
        int status;
        while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
        }
        if (failure.step >= 0 && failure.step < (int)(sizeof stoker_child_steps / sizeof *stoker_child_steps))
            *failed_step = stoker_child_steps[failure.step];
        return failure.error != 0 ? failure.error : ECHILD;
    }
    *pid = child;
    return 0;
}

int stoker_thread_set_name(const char *name) {
    char truncated[16];
    strncpy(truncated, name, sizeof truncated - 1);
    truncated[sizeof truncated - 1] = '\0';
    return pthread_setname_np(pthread_self(), truncated);
}

int stoker_pidfd_open(pid_t pid) {
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0U);
#else
    (void)pid;
    errno = ENOSYS;
    return -1;
#endif
}

#else

int stoker_spawn_dying_with_thread(const char *path, char *const argv[], char *const envp[], int stdout_fd,
                                   int stderr_fd, int death_signal, pid_t *pid, const char **failed_step) {
    (void)path;
    (void)argv;
    (void)envp;
    (void)stdout_fd;
    (void)stderr_fd;
    (void)death_signal;
    (void)pid;
    *failed_step = NULL;
    return ENOSYS;
}

int stoker_pidfd_open(pid_t pid) {
    (void)pid;
    errno = ENOSYS;
    return -1;
}

int stoker_thread_set_name(const char *name) {
    (void)name;
    return ENOSYS;
}

#endif
