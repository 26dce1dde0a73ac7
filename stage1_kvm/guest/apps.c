/*
 * kvmrkt guest init: the apps (stage2) and their confinement. Starts each app in its own mount, PID, IPC and UTS
 * namespaces under a small ns-init (pivot_root into its root, /proc, masked and read-only paths, signals
 * forwarded, its output copied to its ports), execs it with its ids, capability sets, rlimits, no_new_privs and
 * seccomp filter; signals the running apps and reaps them, writing one START and one EXIT status line per app.
 *
 * Trust: the app is hostile: it holds only its stdio (pipes its ns-init copies unparsed to its own ports, or its
 * terminal), cannot see this init, and nothing here interprets what it writes; what it names (its exec path,
 * working directory) reaches messages only through visible().
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
#include <sys/signalfd.h>
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
 * The capability sets the host sent (capsets line): permitted, effective and inheritable by capset, then each
 * ambient capability raised (the host checked the kernel's rules: effective within permitted, ambient within
 * permitted and inheritable, inheritable within bounding). Without the line nothing changes here.
 */
static int set_capsets(const struct app *a)
{
    if (!a->capsets)
        return 0;
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    for (int i = 0; i < 2; i++) {
        data[i].effective = (unsigned)(a->cap_eff >> (32 * i));
        data[i].permitted = (unsigned)(a->cap_perm >> (32 * i));
        data[i].inheritable = (unsigned)(a->cap_inh >> (32 * i));
    }
    if (syscall(SYS_capset, &hdr, data) < 0)
        return -1;
    for (int c = 0; c < 64; c++)
        if ((a->cap_amb >> c & 1) && prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, c, 0, 0) < 0)
            return -1;
    return 0;
}

/*
 * In the app's namespaces (its root is /): become the app and exec argv; never returns. Order: stdio and
 * terminal, working directory, rlimits, capability bounding set, groups and ids (capabilities kept across
 * setuid just long enough to install the seccomp filter without no_new_privs), then no_new_privs and the
 * filter, last, so nothing after it needs a call it may deny; the asked capability sets (set_capsets) before
 * no_new_privs, or (as runc does) after a filter installed without it, which must then allow capset and prctl.
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
    step = "oom_score_adj";
    if (a->oom_set) {
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (fd < 0 || dprintf(fd, "%d", a->oom_score_adj) < 0)
            goto fail;
        close(fd);
    }
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
    if (set_effective(a->uid == 0 ? ~0ULL : 1ULL << CAP_SYS_ADMIN) < 0 || (a->nnp && set_capsets(a) < 0))
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
    step = "capabilities";
    if (!a->nnp && set_capsets(a) < 0)
        goto fail;
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

/*
 * Copy what is in an app's output pipe to its port: once, or (drain, the app has ended) until the pipe is empty, at
 * most 16 buffers (a leftover child may still write). At the pipe's end the pipe is closed and *fd set to -1.
 * read and write, not splice: the 6.1 virtio-console splice_write consumes the pipe's pages and then reports 0 when
 * the port's queue refuses them, so the bytes were gone and the 0 read as the end of the app's output (a libvirt
 * pod under load lost its last line that way, 2 runs in 40); write keeps them in buf and write_all tries again.
 */
static void relay_output(int *fd, int port, int drain)
{
    static char buf[1 << 16];
    if (*fd >= 0 && drain)
        fcntl(*fd, F_SETFL, O_NONBLOCK);
    for (int i = 0; *fd >= 0 && i < (drain ? 16 : 1); i++) {
        ssize_t n = read(*fd, buf, sizeof(buf));
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            return;
        if (n <= 0) {
            close(*fd);
            *fd = -1;
            return;
        }
        write_all(port, buf, (size_t)n);
    }
}

static void ns_fail(struct app *a, int err, const char *what)
{
    int e = errno;
    char shown[1024];
    dprintf(err, "kvmrkt: app %s: %s: %s\n", a->name, visible(what, shown, sizeof(shown)), strerror(e));
    _exit(125);
}

/*
 * PID 1 of an app's new mount, PID, IPC and UTS namespaces (a clone of this init): mount /proc, mqueue and /sys,
 * then its volumes (the OCI spec's order), pivot_root into the app's root (the old root is detached: no way back
 * to the VM's), mask and protect paths, shed every descriptor but the app's stdio and make itself undumpable,
 * then start the app and, like tini, forward every signal to it, copy its output to its ports (relay_output) and
 * exit with its status (its leftovers die with the namespace). Never returns.
 */
void ns_init(struct app *a, const char *hostname, int in, int out, int err)
{
    char p[PATH_MAX];
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        ns_fail(a, err, "making its mounts private");
    snprintf(p, sizeof(p), "%s/proc", a->root);
    if (mount("proc", p, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        ns_fail(a, err, "mounting /proc");
    /*
     * The OCI default mounts in the spec's order (proc, dev, dev/pts, dev/shm, dev/mqueue, sys; runtime-tools
     * checks it in mountinfo): /dev again, a recursive bind of the one setup_dev made, above it.
     */
    for (int i = 0; i < a->nsysctls; i++) {  /* linux.sysctl: the VM's kernel (net.*: the VM's, IPC ones: the app's) */
        int o = snprintf(p, sizeof(p), "%s/proc/sys/", a->root);
        for (const char *c = a->sysctls[i].name; *c && o < (int)sizeof(p) - 1; c++)
            p[o++] = *c == '.' ? '/' : *c;
        p[o] = 0;
        int fd = open(p, O_WRONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0 || write(fd, a->sysctls[i].value, strlen(a->sysctls[i].value)) < 0) {
            snprintf(p, sizeof(p), "sysctl %s", a->sysctls[i].name);
            ns_fail(a, err, p);
        }
        close(fd);
    }
    snprintf(p, sizeof(p), "%s/dev", a->root);
    if (mount(p, p, NULL, MS_BIND | MS_REC, NULL) < 0)
        ns_fail(a, err, "binding /dev");
    snprintf(p, sizeof(p), "%s/dev/mqueue", a->root);
    if (mount("mqueue", p, "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        ns_fail(a, err, "mounting /dev/mqueue");
    snprintf(p, sizeof(p), "%s/sys", a->root);
    if (mount("sysfs", p, "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, NULL) < 0)
        ns_fail(a, err, "mounting /sys");
    if (mount_volumes(a, p, sizeof(p)) < 0)  /* config.json's mounts, after the defaults */
        ns_fail(a, err, p);
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
    /*
     * Without a terminal the app writes into pipes that this process copies to its ports: a virtio port opens
     * only once, so the app could not reopen its stdout through /dev/stdout (/proc/self/fd/1) otherwise.
     */
    int pipes[2][2] = {{-1, -1}, {-1, -1}};
    if (!isatty(1) && (pipe2(pipes[0], O_CLOEXEC) < 0 || pipe2(pipes[1], O_CLOEXEC) < 0))
        ns_fail(a, 2, "pipe");
    if (pipes[0][0] >= 0)
        fcntl(pipes[0][0], F_SETPIPE_SZ, 1 << 20);  /* fewer wake-ups for a chatty app (best effort) */
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    int sfd = signalfd(-1, &all, SFD_CLOEXEC);
    if (sfd < 0)
        ns_fail(a, 2, "signalfd");
    pid_t app = fork();
    if (app == 0)
        exec_app(a, a->argv, 0, pipes[0][1] >= 0 ? pipes[0][1] : 1, pipes[1][1] >= 0 ? pipes[1][1] : 2);
    if (app < 0)
        ns_fail(a, 2, "fork");
    for (int i = 0; i < 2; i++)
        if (pipes[i][1] >= 0)
            close(pipes[i][1]);
    for (;;) {
        struct pollfd p[3] = {{sfd, POLLIN, 0}, {pipes[0][0], POLLIN, 0}, {pipes[1][0], POLLIN, 0}};
        if (poll(p, 3, -1) < 0)
            continue;
        for (int i = 0; i < 2; i++)
            if (p[i + 1].revents)
                relay_output(&pipes[i][0], i + 1, 0);
        struct signalfd_siginfo si;
        if (!(p[0].revents & POLLIN) || read(sfd, &si, sizeof(si)) != sizeof(si))
            continue;
        int sig = (int)si.ssi_signo;
        if (sig == SIGCHLD) {
            int st;
            pid_t pid;
            while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
                if (pid != app)
                    continue;
                for (int i = 0; i < 2; i++)  /* what the app wrote before it ended */
                    relay_output(&pipes[i][0], i + 1, 1);
                _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
            }
        } else if (kill(-app, sig) < 0) {
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
    if (a->terminal) {
        char fdpath[64], console[PATH_MAX];
        int m = open_terminal(a, &term);
        snprintf(fdpath, sizeof(fdpath), "/proc/self/fd/%d", term);
        snprintf(console, sizeof(console), "%s/dev/console", a->root);
        if (m < 0 || mount(fdpath, console, NULL, MS_BIND, NULL) < 0) {  /* /dev/console is its terminal */
            app_error(a, m < 0 ? "allocating a terminal" : "binding its terminal to /dev/console");
            if (m >= 0) {
                close(m);
                close(term);
            }
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

void reap(struct pod *pod, void (*other)(pid_t pid, void *ctx), void *ctx)
{
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        int app = 0;
        for (int i = 0; i < pod->napps; i++) {
            if (pod->apps[i].running && pod->apps[i].pid == pid) {
                app = 1;
                pod->apps[i].running = 0;
                pod->apps[i].exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
                status("EXIT %s %d", pod->apps[i].name, pod->apps[i].exit_code);
            }
        }
        if (!app && other)
            other(pid, ctx);
    }
}
