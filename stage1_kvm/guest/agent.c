/*
 * kvmrkt guest init: the agent. Supervises the running apps and answers the host on the sig port (STOP, KILL,
 * WINSZ, PING; GO while held) and the ctl port (ENTER: an enter session, run in a forked helper that relays the
 * command's stdio as frames), and relays app 0's terminal to and from its ports.
 *
 * Trust: requests come from the host (stage0) and are trusted; a frame larger than the buffer is dropped. What an
 * entered command or app 0 writes is copied to the host as bytes, never interpreted here.
 */
#include "init.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static void send_frame(int fd, const char *kind, const char *buf, size_t n)
{
    char hdr[64];
    int h = snprintf(hdr, sizeof(hdr), "%s %zu\n", kind, n);
    write_all(fd, hdr, (size_t)h);
    write_all(fd, buf, n);
}

static int session_tty = -1;  /* an enter session's terminal master (EOF does not close it) */

static int tty_master_is(int fd)
{
    return fd >= 0 && fd == session_tty;
}

/*
 * Input frames from the host during an enter session: "IN <n>\n<bytes>" (to the command's stdin or terminal),
 * "EOF\n" (close its stdin), "SIG <signal>\n" (signal its session), "WINSZ <rows> <cols>\n" (its terminal). Consumes complete frames from buf.
 */
static size_t session_input(char *buf, size_t len, int *in, pid_t pid)
{
    size_t used = 0;
    while (used < len) {
        char *nl = memchr(buf + used, '\n', len - used);
        if (!nl)
            break;
        size_t hdr = (size_t)(nl - (buf + used)) + 1;
        if (!strncmp(buf + used, "IN ", 3)) {
            size_t n = strtoul(buf + used + 3, NULL, 10);
            if (used + hdr + n > len)
                break;  /* the payload is not all here yet */
            if (*in >= 0)
                write_all(*in, buf + used + hdr, n);
            used += hdr + n;
            continue;
        }
        if (!strncmp(buf + used, "EOF", 3) && *in >= 0 && !tty_master_is(*in)) {
            close(*in);
            *in = -1;
        } else if (!strncmp(buf + used, "SIG ", 4)) {
            kill(-pid, atoi(buf + used + 4));
        } else if (!strncmp(buf + used, "WINSZ ", 6) && session_tty >= 0) {
            struct winsize ws = {0};
            char *end = NULL;
            ws.ws_row = (unsigned short)strtoul(buf + used + 6, &end, 10);
            ws.ws_col = (unsigned short)strtoul(end, NULL, 10);
            ioctl(session_tty, TIOCSWINSZ, &ws);
        }
        used += hdr;
    }
    return used;
}

/*
 * Enter session, run in a forked helper that owns the ctl port until the command exits. Request:
 * "ENTER <app> <argc> <arg>... [tty] [stdin]": with tty the command runs on a new terminal (output as OUT
 * frames, input to the terminal); with stdin it reads what the host sends as IN frames. If the host hangs up,
 * the command's session is killed.
 */
static void enter_session(struct pod *pod, int ctl, char **fields, int n)
{
    struct app *a = n >= 3 ? app_named(pod, fields[1]) : NULL;
    int argc = n >= 3 ? atoi(fields[2]) : 0;
    if (!a || argc < 1 || argc > n - 3 || !a->root[0]) {
        dprintf(ctl, "FAIL %s\n", a ? "bad%20enter%20request" : "no%20such%20app");
        _exit(0);
    }
    int want_tty = 0, want_in = 0;
    struct app *as = malloc(sizeof(*as));  /* the app, with this session's env/cwd/uid/gid */
    if (!as)
        _exit(0);
    *as = *a;
    int envc = 0;
    for (int i = 3 + argc; i < n; i++) {
        const char *f = fields[i];
        want_tty |= !strcmp(f, "tty");
        want_in |= !strcmp(f, "stdin");
        if (!strcmp(f, "noenv") || (!strncmp(f, "env=", 4) && envc == 0))
            as->envc = 0;  /* an env given for the session replaces the app's */
        if (!strncmp(f, "env=", 4) && as->envc < MAX_LIST - 1)
            as->env[as->envc++] = (char *)f + 4, envc++;
        else if (!strncmp(f, "cwd=", 4))
            as->cwd = (char *)f + 4;
        else if (!strncmp(f, "uid=", 4))
            as->uid = (uid_t)strtoul(f + 4, NULL, 10);
        else if (!strncmp(f, "gid=", 4))
            as->gid = (gid_t)strtoul(f + 4, NULL, 10), as->ngroups = 0;
    }
    as->env[as->envc] = NULL;
    a = as;
    char **argv = calloc((size_t)argc + 1, sizeof(char *));
    for (int i = 0; i < argc; i++)
        argv[i] = fields[3 + i];
    int po[2] = {-1, -1}, pe[2] = {-1, -1}, pi[2] = {-1, -1}, term = -1, in = -1;
    if (want_tty) {
        int m = open_terminal(a, &term);
        if (m < 0) {
            dprintf(ctl, "FAIL no%%20terminal\n");
            _exit(0);
        }
        struct winsize ws = {.ws_row = 24, .ws_col = 80};
        ioctl(m, TIOCSWINSZ, &ws);
        po[0] = in = m;
        session_tty = m;
    } else if (pipe2(po, O_CLOEXEC) < 0 || pipe2(pe, O_CLOEXEC) < 0 || (want_in && pipe2(pi, O_CLOEXEC) < 0)) {
        dprintf(ctl, "FAIL pipe\n");
        _exit(0);
    }
    /* Into the app's namespaces (its ns-init's): the command is then a child in its PID namespace. */
    int nsfd = a->running ? (int)syscall(SYS_pidfd_open, a->pid, 0) : -1;
    if (nsfd < 0 || setns(nsfd, CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS) < 0) {
        dprintf(ctl, "FAIL the%%20app%%20is%%20not%%20running\n");
        _exit(0);
    }
    close(nsfd);
    pid_t pid = fork();
    if (pid == 0) {
        if (term >= 0)
            exec_app(a, argv, term, term, term);
        exec_app(a, argv, want_in ? pi[0] : open("/dev/null", O_RDONLY | O_CLOEXEC), po[1], pe[1]);
    }
    if (term >= 0) {
        close(term);
    } else {
        close(po[1]);
        close(pe[1]);
        if (want_in) {
            close(pi[0]);
            in = pi[1];
        }
    }
    struct pollfd p[3] = {{po[0], POLLIN, 0}, {pe[0], POLLIN, 0}, {ctl, POLLIN, 0}};
    int open_fds = want_tty ? 1 : 2;
    char buf[16384], inbuf[65536 + 64];
    size_t inlen = 0;
    while (open_fds > 0) {
        if (poll(p, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        for (int i = 0; i < 2; i++) {
            if (p[i].fd < 0 || !(p[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            ssize_t r = read(p[i].fd, buf, sizeof(buf));
            if (r <= 0) {  /* a terminal reads EIO once the command and its children have closed it */
                if (p[i].fd != in)
                    close(p[i].fd);
                p[i].fd = -1;
                open_fds--;
            } else {
                send_frame(ctl, i == 0 ? "OUT" : "ERR", buf, (size_t)r);
            }
        }
        if (p[2].revents & POLLIN) {
            ssize_t r = read(ctl, inbuf + inlen, sizeof(inbuf) - inlen);
            if (r > 0) {
                inlen += (size_t)r;
                size_t used = session_input(inbuf, inlen, &in, pid);
                memmove(inbuf, inbuf + used, inlen - used);
                inlen -= used;
                if (inlen == sizeof(inbuf))
                    inlen = 0;  /* a frame larger than the buffer: not from our host agent */
            }
        } else if (p[2].revents & POLLHUP) {
            kill(-pid, SIGKILL);  /* the host side went away: so does the command */
            p[2].fd = -1;
        }
    }
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    dprintf(ctl, "EXIT %d\n", code);
    _exit(0);
}

/* Copy what the app wrote to its terminal to the output port; when it has exited (done), drain and close. */
static void relay_terminal_output(struct tty_relay *relay, int done)
{
    char buf[16384];
    ssize_t n = read(relay->master, buf, sizeof(buf));
    if (n > 0)
        write_all(relay->out, buf, (size_t)n);
    if (n <= 0 || done) {
        fcntl(relay->master, F_SETFL, O_NONBLOCK);
        while ((n = read(relay->master, buf, sizeof(buf))) > 0)
            write_all(relay->out, buf, (size_t)n);
        if (n < 0 && errno == EAGAIN && !done)
            return;
        close(relay->master);
        close(relay->out);
        relay->master = relay->out = -1;
    }
}

/* Read one request line from a control port; returns the line length, 0 for none, -1 if the host hung up. */
static ssize_t read_request(int fd, char *buf, size_t len)
{
    size_t o = 0;
    while (o < len - 1) {
        ssize_t r = read(fd, buf + o, 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return o ? (ssize_t)o : -1;
        if (buf[o] == '\n')
            break;
        o++;
    }
    buf[o] = 0;
    return (ssize_t)o;
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* "WINSZ <rows> <cols>": app 0's terminal size (the kernel signals the app's foreground group with SIGWINCH). */
static void set_tty_size(struct tty_relay *relay, const char *rows, const char *cols)
{
    relay->size.ws_row = (unsigned short)atoi(rows);
    relay->size.ws_col = (unsigned short)atoi(cols);
    if (relay->master >= 0)
        ioctl(relay->master, TIOCSWINSZ, &relay->size);
}

void supervise(struct pod *pod, struct tty_relay *relay, int ctl, int sig)
{
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    long long kill_at = 0;
    int ctl_up = 1, sig_up = 1;
    pid_t enter_pid = 0;  /* the enter session's helper, while one runs */
    reap(pod, &enter_pid);
    int in_up = 1;
    while (apps_running(pod) > 0 || relay->master >= 0) {
        struct pollfd p[5] = {{sfd, POLLIN, 0}, {-1, POLLIN, 0}, {-1, POLLIN, 0}, {relay->master, POLLIN, 0},
                              {relay->master >= 0 && in_up ? relay->in : -1, POLLIN, 0}};
        if (ctl >= 0 && ctl_up && !enter_pid)
            p[1].fd = ctl;
        if (sig >= 0 && sig_up)
            p[2].fd = sig;
        /* A port whose host side is closed reports POLLHUP at once: look again every 100 ms. */
        int timeout = (ctl_up && sig_up) ? -1 : 100;
        if (kill_at) {
            int left = (int)(kill_at - now_ms());
            timeout = timeout < 0 || left < timeout ? (left < 0 ? 0 : left) : timeout;
        }
        int r = poll(p, 5, timeout);
        if (r < 0 && errno != EINTR)
            break;
        if (p[3].revents & (POLLIN | POLLHUP | POLLERR))
            relay_terminal_output(relay, apps_running(pod) == 0);
        if (p[4].revents & POLLIN) {
            char buf[4096];
            ssize_t n = read(relay->in, buf, sizeof(buf));
            if (n > 0)
                write_all(relay->master, buf, (size_t)n);
            else
                in_up = 0;
        } else if (p[4].revents & POLLHUP) {
            in_up = 0;  /* the host closed its end: nothing more to type */
        }
        if (p[0].revents & POLLIN) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof(si)) > 0)
                ;
        }
        reap(pod, &enter_pid);
        ctl_up = !(p[1].fd >= 0 && (p[1].revents & POLLHUP) && !(p[1].revents & POLLIN));
        sig_up = !(p[2].fd >= 0 && (p[2].revents & POLLHUP) && !(p[2].revents & POLLIN));
        if (r == 0) {
            ctl_up = sig_up = 1;
        }
        char req[65536];
        if (p[2].fd >= 0 && (p[2].revents & POLLIN) && read_request(sig, req, sizeof(req)) > 0) {
            char *f[4];
            int n = split(req, f, 4);
            if (n == 2 && !strcmp(f[0], "STOP")) {
                signal_apps(pod, SIGTERM);
                kill_at = now_ms() + 1000LL * atoi(f[1]);
                write_all(sig, "OK\n", 3);
            } else if (n >= 2 && !strcmp(f[0], "KILL") && atoi(f[1]) > 0 && atoi(f[1]) < 65) {
                if (n == 3 && !strcmp(f[2], "all"))
                    kill(-1, atoi(f[1]));  /* from PID 1: every process but init itself */
                else
                    signal_apps(pod, atoi(f[1]));
                write_all(sig, "OK\n", 3);
            } else if (n == 3 && !strcmp(f[0], "WINSZ")) {
                set_tty_size(relay, f[1], f[2]);
                write_all(sig, "OK\n", 3);
            } else if (n >= 1 && !strcmp(f[0], "PING")) {
                write_all(sig, "PONG\n", 5);
            } else {
                write_all(sig, "FAIL unknown%20request\n", 23);
            }
        }
        if (p[1].fd >= 0 && (p[1].revents & POLLIN) && read_request(ctl, req, sizeof(req)) > 0) {
            char *f[MAX_LIST];
            int n = split(req, f, MAX_LIST);
            if (n >= 1 && !strcmp(f[0], "ENTER")) {
                pid_t pid = fork();
                if (pid == 0)
                    enter_session(pod, ctl, f, n);
                if (pid > 0)
                    enter_pid = pid;
            } else {
                write_all(ctl, "FAIL unknown%20request\n", 23);
            }
        }
        if (kill_at && now_ms() >= kill_at) {
            signal_apps(pod, SIGKILL);
            kill_at = 0;
        }
    }
}

/* Report HELD, then wait on the sig port for GO (returns 0) or KILL <signal> (returns the signal). */
int wait_for_go(struct tty_relay *relay, int sig)
{
    if (sig < 0)
        return SIGKILL;
    status("HELD");
    char req[256];
    for (;;) {
        struct pollfd p = {sig, POLLIN, 0};
        int r = poll(&p, 1, 100);
        if (r <= 0 || !(p.revents & POLLIN)) {
            if (r > 0)
                usleep(100000);  /* POLLHUP: no host connected to the port yet */
            continue;
        }
        if (read_request(sig, req, sizeof(req)) <= 0)
            continue;
        char *f[4];
        int n = split(req, f, 4);
        if (n == 1 && !strcmp(f[0], "GO")) {
            write_all(sig, "OK\n", 3);
            return 0;
        } else if (n >= 2 && !strcmp(f[0], "KILL") && atoi(f[1]) > 0 && atoi(f[1]) < 65) {
            write_all(sig, "OK\n", 3);
            return atoi(f[1]);
        } else if (n == 3 && !strcmp(f[0], "WINSZ")) {
            set_tty_size(relay, f[1], f[2]);
            write_all(sig, "OK\n", 3);
        } else if (n == 1 && !strcmp(f[0], "PING")) {
            write_all(sig, "PONG\n", 5);
        } else {
            write_all(sig, "FAIL not%20started\n", 19);
        }
    }
}
