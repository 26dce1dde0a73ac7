/*
 * kvmrkt guest init: the apps (stage2) and their confinement. Starts each app in its own mount, PID, IPC and UTS
 * namespaces under a small ns-init (pivot_root into its root, /proc, masked and read-only paths, signals
 * forwarded), execs it with its ids, capability bounding set, rlimits, no_new_privs and seccomp filter; signals
 * the running apps and reaps them, writing one START and one EXIT status line per app.
 *
 * Trust: the app is hostile: it holds only its stdio ports, cannot see this init, and nothing here reads what it
 * writes; what it names (its exec path, working directory) reaches messages only through visible().
 */
#include "init.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/capability.h>
#include <linux/seccomp.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static const char *env_path(char **env)
{
    for (char **e = env; *e; e++)
        if (!strncmp(*e, "PATH=", 5))
            return *e + 5;
    return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
}

/* execve() with a PATH search done inside the app's root (the caller is already in its mount namespace). */
static void exec_in_path(char **argv, char **env)
{
    if (strchr(argv[0], '/')) {
        execve(argv[0], argv, env);
        return;
    }
    const char *path = env_path(env);
    int saved = ENOENT;
    while (*path) {
        size_t len = strcspn(path, ":");
        char full[PATH_MAX];
        snprintf(full, sizeof(full), "%.*s/%s", (int)len, path, argv[0]);
        execve(full, argv, env);
        if (errno != ENOENT)
            saved = errno;
        path += len;
        if (*path == ':')
            path++;
    }
    errno = saved;
}

/* Keep only the capabilities in `keep` in the effective set (the permitted set is left as it is). */
static int set_effective(unsigned long long keep)
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &hdr, data) < 0)
        return -1;
    for (int i = 0; i < 2; i++) {
        data[i].effective = data[i].permitted & (unsigned)(keep >> (32 * i));
        data[i].inheritable = 0;
    }
    return (int)syscall(SYS_capset, &hdr, data);
}

/*
 * In the app's namespaces (its root is /): become the app and exec argv; never returns. Order: stdio and
 * terminal, working directory, rlimits, capability bounding set, groups and ids (capabilities kept across
 * setuid just long enough to install the seccomp filter without no_new_privs), then no_new_privs and the
 * filter, last, so nothing after it needs a call it may deny.
 */
void exec_app(struct app *a, char **argv, int in, int out, int err)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    setsid();
    if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
        _exit(125);
    if (isatty(0))
        ioctl(0, TIOCSCTTY, 0);
    syscall(SYS_close_range, 3U, ~0U, 0);
    const char *step = "chdir";
    if (chdir(a->cwd) < 0)
        goto fail;
    step = "setrlimit";
    for (int i = 0; i < a->nrlimits; i++) {
        struct rlimit rl = {a->rlimits[i].soft, a->rlimits[i].hard};
        if (setrlimit(a->rlimits[i].resource, &rl) < 0)
            goto fail;
    }
    step = "capabilities";
    for (int c = 0; c < 64 && prctl(PR_CAPBSET_READ, c, 0, 0, 0) >= 0; c++)  /* up to the kernel's last */
        if (!(a->caps & (1ULL << c)) && prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0)
            goto fail;
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        goto fail;
    step = "setgroups";
    if (setgroups((size_t)a->ngroups, a->groups) < 0)
        goto fail;
    step = "setgid";
    if (setgid(a->gid) < 0)
        goto fail;
    step = "setuid";
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0 || setuid(a->uid) < 0)
        goto fail;
    step = "capabilities";
    if (set_effective(a->uid == 0 ? ~0ULL : 1ULL << CAP_SYS_ADMIN) < 0)
        goto fail;
    step = "no_new_privs";
    if (a->nnp && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        goto fail;
    step = "seccomp";
    if (a->filter) {
        struct sock_fprog prog = {a->filter_len, a->filter};
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) < 0)
            goto fail;
    }
    exec_in_path(argv, a->env);
    int e = errno;
    char shown[1024];
    dprintf(2, "kvmrkt: cannot execute %s in app %s: %s\n", visible(argv[0], shown, sizeof(shown)), a->name,
            strerror(e));
    _exit(e == ENOENT ? 127 : 126);
fail:
    e = errno;
    dprintf(2, "kvmrkt: app %s: %s %s: %s\n", a->name, step,
            step[2] == 'd' ? visible(a->cwd, shown, sizeof(shown)) : "", strerror(e));
    _exit(125);
}

/* Mask (a file: /dev/null over it; a directory: an empty read-only tmpfs) or make read-only a path of the app. */
static int restrict_path(const char *path, int mask)
{
    struct stat st;
    if (stat(path, &st) < 0)
        return errno == ENOENT ? 0 : -1;
    if (mask && S_ISDIR(st.st_mode))
        return mount("kvmrkt-masked", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555");
    if (mask)
        return mount("/dev/null", path, NULL, MS_BIND, NULL);
    if (mount(path, path, NULL, MS_BIND | MS_REC, NULL) < 0)
        return -1;
    return mount(NULL, path, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
}

static void ns_fail(struct app *a, int err, const char *what)
{
    int e = errno;
    char shown[1024];
    dprintf(err, "kvmrkt: app %s: %s: %s\n", a->name, visible(what, shown, sizeof(shown)), strerror(e));
    _exit(125);
}

/*
 * PID 1 of an app's new mount, PID, IPC and UTS namespaces (a clone of this init): mount /proc and the mqueue,
 * pivot_root into the app's root (the old root is detached: no way back to the VM's), mask and protect paths,
 * shed every descriptor but the app's stdio and make itself undumpable, then start the app and, like tini,
 * forward every signal to it and exit with its status (its leftovers die with the namespace). Never returns.
 */
static void ns_init(struct app *a, const char *hostname, int in, int out, int err)
{
    char p[PATH_MAX];
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        ns_fail(a, err, "making its mounts private");
    snprintf(p, sizeof(p), "%s/proc", a->root);
    if (mount("proc", p, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        ns_fail(a, err, "mounting /proc");
    snprintf(p, sizeof(p), "%s/dev/mqueue", a->root);
    if (mount("mqueue", p, "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        ns_fail(a, err, "mounting /dev/mqueue");
    if (hostname)
        sethostname(hostname, strlen(hostname));
    if (chdir(a->root) < 0 || syscall(SYS_pivot_root, ".", ".") < 0 || umount2(".", MNT_DETACH) < 0 || chdir("/") < 0)
        ns_fail(a, err, "entering its root");
    for (int i = 0; i < a->nmasked; i++)
        if (restrict_path(a->masked[i], 1) < 0)
            ns_fail(a, err, a->masked[i]);
    for (int i = 0; i < a->nro; i++)
        if (restrict_path(a->ropaths[i], 0) < 0)
            ns_fail(a, err, a->ropaths[i]);
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
        _exit(125);
    syscall(SYS_close_range, 3U, ~0U, 0);
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    pid_t app = fork();
    if (app == 0)
        exec_app(a, a->argv, 0, 1, 2);
    if (app < 0)
        ns_fail(a, 2, "fork");
    for (;;) {
        siginfo_t si;
        int sig = sigwaitinfo(&all, &si);
        if (sig == SIGCHLD) {
            int st;
            pid_t pid;
            while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
                if (pid == app)
                    _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
        } else if (sig > 0 && kill(-app, sig) < 0) {
            kill(app, sig);  /* not yet a process group leader */
        }
    }
}

/*
 * A new terminal in the app's own devpts instance, so the process finds its name inside the app (ttyname); returns
 * the master and puts the terminal (slave) in *peer.
 */
int open_terminal(struct app *a, int *peer)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/dev/pts/ptmx", a->root);
    int unlock = 0, m = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m >= 0 && (ioctl(m, TIOCSPTLCK, &unlock) < 0 || (*peer = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY)) < 0)) {
        close(m);
        m = -1;
    }
    return m;
}

void start_app(struct pod *pod, int idx, struct tty_relay *relay)
{
    struct app *a = &pod->apps[idx];
    char name[64];
    snprintf(name, sizeof(name), "kvmrkt.out.%d", idx);
    int out = open_port(name, O_WRONLY);
    snprintf(name, sizeof(name), "kvmrkt.err.%d", idx);
    int err = open_port(name, O_WRONLY);
    int in = -1;
    if (pod->interactive && idx == 0) {
        in = relay->in;
        /* Wait (bounded) for the host to connect, so the app does not read an early EOF. */
        for (int i = 0; in >= 0 && i < 1000; i++) {
            struct pollfd p = {in, POLLIN, 0};
            if (poll(&p, 1, 0) >= 0 && !(p.revents & POLLHUP))
                break;
            usleep(5000);
        }
    }
    if (in < 0)
        in = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (out < 0 || err < 0 || in < 0) {
        app_error(a, "opening stdio ports");
        a->exit_code = 125;
        status("EXIT %s 125", a->name);
        return;
    }
    a->argv[a->argc] = NULL;
    a->env[a->envc] = NULL;
    int term = -1;
    if (pod->tty && idx == 0) {
        int m = open_terminal(a, &term);
        if (m < 0) {
            app_error(a, "allocating a terminal");
            a->exit_code = 125;
            status("EXIT %s 125", a->name);
            return;
        }
        ioctl(m, TIOCSWINSZ, &relay->size);
        relay->master = m;
    }
    pid_t pid = (pid_t)syscall(SYS_clone, CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | SIGCHLD,
                               NULL, NULL, NULL, 0);
    if (pid == 0) {
        if (term >= 0)
            ns_init(a, pod->hostname, term, term, term);
        ns_init(a, pod->hostname, in, out, err);
    }
    if (term >= 0) {
        close(term);
        relay->out = out;  /* kept: the terminal's output is relayed to it, and stdin (in) to the terminal */
    } else {
        close(in);
        close(out);
    }
    close(err);
    if (pid < 0) {
        app_error(a, "fork");
        a->exit_code = 125;
        status("EXIT %s 125", a->name);
        return;
    }
    a->pid = pid;
    a->running = 1;
    status("START %s %d", a->name, (int)pid);
}

struct app *app_named(struct pod *pod, const char *name)
{
    for (int i = 0; i < pod->napps; i++)
        if (!strcmp(pod->apps[i].name, name))
            return &pod->apps[i];
    return NULL;
}

/* Signal every running app: its ns-init passes the signal on (SIGKILL ends its whole namespace). */
void signal_apps(struct pod *pod, int sig)
{
    for (int i = 0; i < pod->napps; i++)
        if (pod->apps[i].running)
            kill(pod->apps[i].pid, sig);
}

int apps_running(const struct pod *pod)
{
    int n = 0;
    for (int i = 0; i < pod->napps; i++)
        n += pod->apps[i].running;
    return n;
}

void reap(struct pod *pod, pid_t *enter_pid)
{
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        if (pid == *enter_pid) {
            *enter_pid = 0;
            continue;
        }
        for (int i = 0; i < pod->napps; i++) {
            if (pod->apps[i].running && pod->apps[i].pid == pid) {
                pod->apps[i].running = 0;
                pod->apps[i].exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
                status("EXIT %s %d", pod->apps[i].name, pod->apps[i].exit_code);
            }
        }
    }
}
