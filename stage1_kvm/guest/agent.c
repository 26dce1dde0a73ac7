/*
 * kvmrkt guest init: the agent. Supervises the running apps and answers the host on the sig port (STOP, KILL,
 * WINSZ, PING; GO while held) and the ctl port (enter sessions, many at once), and relays app 0's terminal to
 * and from its ports.
 *
 * The ctl port is multiplexed: every frame starts with a session id (<sid>, a decimal the host picks and never
 * reuses while the VM runs). Host -> guest: "<sid> ENTER <app> <argc> <arg>... [flags]\n" (a new session),
 * "<sid> IN <n>\n<n bytes>" (n <= 16 KiB, to the command's stdin or terminal), "<sid> EOF\n" (close its stdin
 * once what came before is written), "<sid> SIG <signal>\n", "<sid> WINSZ <rows> <cols>\n", "<sid> HUP\n" (the
 * host client went away: the command's session is SIGKILLed). Guest -> host: "<sid> OUT <n>\n<n bytes>",
 * "<sid> ERR <n>\n<n bytes>" (n <= 16 KiB), "<sid> ACK <n>\n" (n more input bytes were written to the command),
 * then exactly one of "<sid> EXIT <code>\n" or "<sid> FAIL <%-escaped reason>\n". "<sid> CREATE <name> [tty]
 * [stdin]\n" starts a container session instead (containers.c: "<sid> HELD", then "<sid> GO" from the host,
 * "<sid> STARTED <pid>", then as an enter session).
 * PID 1 reads the port all the time and routes each host frame, without its sid, to the session's helper over a
 * SOCK_SEQPACKET socketpair (one frame per message, sent without blocking); ENTER forks the helper (at most
 * MAX_SESSIONS at once). Helpers write their frames to the port themselves, each frame as ONE write() under
 * 32 KiB: virtio_console queues one buffer per write() (at most 32 KiB), so frames never interleave. Input flow
 * control: the host keeps at most IN_WINDOW bytes of IN payload unacknowledged per session and the helper
 * buffers them until the command reads them, so a command that does not read its stdin stalls only its own
 * session's input and never PID 1; a frame PID 1 cannot hand over at once (the host broke the window) cuts that
 * session off (its helper sees the hang-up and kills the command). The sid is freed when the helper is reaped.
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
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#define MAX_SESSIONS 64
#define MAX_IN_FRAME 16384            /* payload of one host IN frame */
#define IN_WINDOW 262144              /* unacknowledged IN payload the host may send one session */
#define OUT_CHUNK 16384               /* payload of one OUT/ERR frame: with its header, one write under 32 KiB */
#define MAX_REQUEST 65536             /* one ENTER line */

/* One frame to the ctl port in ONE write (see the header comment). */
static void send_frame(int ctl, unsigned long long sid, const char *kind, const char *buf, size_t n)
{
    char frame[64 + OUT_CHUNK];
    int h = snprintf(frame, 64, "%llu %s %zu\n", sid, kind, n);
    memcpy(frame + h, buf, n);
    write_all(ctl, frame, (size_t)h + n);
}

void send_line(int ctl, unsigned long long sid, const char *fmt, ...)
{
    char line[512];
    int h = snprintf(line, sizeof(line), "%llu ", sid);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line + h, sizeof(line) - (size_t)h - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)h + (n < 0 ? 0 : (size_t)n < sizeof(line) - (size_t)h - 1 ? (size_t)n
                                                      : sizeof(line) - (size_t)h - 2);
    line[len++] = '\n';
    write_all(ctl, line, len);
}

/* A session's input, in its helper: what the host sent that the command has not read yet. */
struct session_input {
    char buf[IN_WINDOW + MAX_IN_FRAME];
    size_t len;
    size_t acked;     /* written (or discarded), not yet acknowledged to the host */
    int eof;          /* the host sent EOF: close stdin once buf is written */
    int hup;          /* the host client is gone */
};

struct session_input *session_input_new(void)
{
    return calloc(1, sizeof(struct session_input));
}

int session_hup(const struct session_input *si)
{
    return si->hup;
}

/*
 * One frame from PID 1 (the host's frame without its sid): "IN <n>\n<bytes>", "EOF", "SIG <signal>" (to
 * `target`: an entered command's process group, a container's ns-init), "WINSZ <rows> <cols>", "HUP". Input the
 * command has no stdin for is acknowledged and dropped; other frames are ignored.
 */
void session_frame(struct session_input *si, char *msg, size_t len, int in, int tty, pid_t target)
{
    char *nl = memchr(msg, '\n', len);
    if (!nl)
        return;
    *nl = 0;
    size_t hdr = (size_t)(nl - msg) + 1;
    if (!strncmp(msg, "IN ", 3)) {
        size_t n = strtoul(msg + 3, NULL, 10);
        if (n != len - hdr)
            return;
        if (in >= 0 && si->len + n <= sizeof(si->buf)) {
            memcpy(si->buf + si->len, msg + hdr, n);
            si->len += n;
        } else {
            si->acked += n;  /* no stdin (or the host broke the window): dropped */
        }
    } else if (!strcmp(msg, "EOF")) {
        si->eof = 1;
    } else if (!strncmp(msg, "SIG ", 4) && target) {
        int sig = atoi(msg + 4);
        if (sig > 0 && sig < 65)
            kill(target, sig);
    } else if (!strncmp(msg, "WINSZ ", 6) && tty >= 0) {
        struct winsize ws = {0};
        char *end = NULL;
        ws.ws_row = (unsigned short)strtoul(msg + 6, &end, 10);
        ws.ws_col = (unsigned short)strtoul(end, NULL, 10);
        ioctl(tty, TIOCSWINSZ, &ws);
    } else if (!strcmp(msg, "HUP")) {
        si->hup = 1;
    }
}

/*
 * The relay of a running session (enter or container), in its helper: `out` and `err` (-1: none; a terminal's
 * master is `out` and `tty`) as OUT/ERR frames, the host's input to `in` as far as the command reads it (ACK),
 * signals to `target`; if the host hangs up, `target` is SIGKILLed. Ends when the outputs are closed; returns
 * the exit code of `child` (its status, or 128+signal).
 */
int session_relay(int ctl, int sp, unsigned long long sid, struct session_input *si, int out, int err, int in,
                  int tty, pid_t target, pid_t child)
{
    if (in >= 0)  /* written as far as the command reads, never blocking the session's output */
        fcntl(in, F_SETFL, fcntl(in, F_GETFL) | O_NONBLOCK);
    struct pollfd p[4] = {{out, POLLIN, 0}, {err, POLLIN, 0}, {sp, POLLIN, 0}, {-1, POLLOUT, 0}};
    int open_fds = (out >= 0) + (err >= 0);
    char buf[OUT_CHUNK], msg[MAX_IN_FRAME + 64];
    if (si->hup)
        kill(target, SIGKILL);
    while (open_fds > 0) {
        p[3].fd = si->len > 0 && in >= 0 ? in : -1;
        if (poll(p, 4, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        for (int i = 0; i < 2; i++) {
            if (p[i].fd < 0 || !(p[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            ssize_t r = read(p[i].fd, buf, sizeof(buf));
            if (r < 0 && (errno == EAGAIN || errno == EINTR))
                continue;
            if (r <= 0) {  /* a terminal reads EIO once the command and its children have closed it */
                if (p[i].fd != in)
                    close(p[i].fd);
                p[i].fd = -1;
                open_fds--;
            } else {
                send_frame(ctl, sid, i == 0 ? "OUT" : "ERR", buf, (size_t)r);
            }
        }
        if (p[2].fd >= 0 && (p[2].revents & POLLIN)) {
            ssize_t r = recv(sp, msg, sizeof(msg) - 1, 0);
            if (r > 0)
                session_frame(si, msg, (size_t)r, in, tty, target);
            else if (r == 0 || errno != EINTR)
                si->hup = 1;
        } else if (p[2].fd >= 0 && (p[2].revents & (POLLHUP | POLLERR))) {
            si->hup = 1;  /* PID 1 cut the session off */
        }
        if (si->hup && p[2].fd >= 0) {
            kill(target, SIGKILL);  /* the host side went away: so does the command */
            p[2].fd = -1;
        }
        if (p[3].fd >= 0 && (p[3].revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t w = write(in, si->buf, si->len);
            if (w > 0) {
                memmove(si->buf, si->buf + w, si->len - (size_t)w);
                si->len -= (size_t)w;
                si->acked += (size_t)w;
            } else if (w < 0 && errno != EAGAIN && errno != EINTR) {  /* the command closed its stdin */
                si->acked += si->len;
                si->len = 0;
            }
        }
        if (si->eof && si->len == 0 && in >= 0 && in != tty) {
            close(in);
            in = -1;
        }
        if (si->acked > 0 && !si->hup) {
            send_line(ctl, sid, "ACK %zu", si->acked);
            si->acked = 0;
        }
    }
    int st = 0;
    while (waitpid(child, &st, 0) < 0 && errno == EINTR)
        ;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/*
 * Enter session, run in a forked helper: frames from PID 1 on `sp`, frames to the host on the ctl port. Request:
 * "ENTER <app> <argc> <arg>... [tty] [stdin]": <app> an app of the pod or a running container (containers.c);
 * with tty the command runs on a new terminal (output as OUT frames, input to the terminal); with stdin it reads
 * what the host sends as IN frames. If the host hangs up, the command's session is killed.
 */
static void enter_session(struct pod *pod, int ctl, int sp, unsigned long long sid, char **fields, int n)
{
    struct app *a = n >= 3 ? app_named(pod, fields[1]) : NULL;
    pid_t nspid = a && a->running && a->root[0] ? a->pid : 0;
    if (!a && n >= 3)
        a = container_named(fields[1], &nspid);
    int argc = n >= 3 ? atoi(fields[2]) : 0;
    if (!a || argc < 1 || argc > n - 3) {
        send_line(ctl, sid, "FAIL %s", a ? "bad%20enter%20request" : "no%20such%20app%20or%20running%20container");
        _exit(0);
    }
    int want_tty = 0, want_in = 0;
    struct app *as = malloc(sizeof(*as));  /* the app, with this session's env/cwd/uid/gid */
    struct session_input *si = session_input_new();
    if (!as || !si)
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
    /* Into the app's namespaces (its ns-init's): the command is then a child in its PID namespace. */
    int nsfd = nspid ? (int)syscall(SYS_pidfd_open, nspid, 0) : -1;
    if (nsfd < 0 || setns(nsfd, CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS) < 0) {
        send_line(ctl, sid, "FAIL the%%20app%%20is%%20not%%20running");
        _exit(0);
    }
    close(nsfd);
    a->root[0] = 0;  /* in its mount namespace now: its root is / */
    int po[2] = {-1, -1}, pe[2] = {-1, -1}, pi[2] = {-1, -1}, term = -1, in = -1, tty = -1;
    if (want_tty) {
        int m = open_terminal(a, &term);
        if (m < 0) {
            send_line(ctl, sid, "FAIL no%%20terminal");
            _exit(0);
        }
        struct winsize ws = {.ws_row = 24, .ws_col = 80};
        ioctl(m, TIOCSWINSZ, &ws);
        po[0] = in = tty = m;
    } else if (pipe2(po, O_CLOEXEC) < 0 || pipe2(pe, O_CLOEXEC) < 0 || (want_in && pipe2(pi, O_CLOEXEC) < 0)) {
        send_line(ctl, sid, "FAIL pipe");
        _exit(0);
    }
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
    int code = session_relay(ctl, sp, sid, si, po[0], pe[0], in, tty, -pid, pid);
    send_line(ctl, sid, "EXIT %d", code);
    _exit(0);
}

/* PID 1's table of enter sessions: each one's sid, helper and PID 1's end of its socketpair. */
struct session {
    unsigned long long sid;  /* 0: a free slot */
    pid_t pid;
    int fd;
    char ctr[48];            /* a CREATE session: its container's name (its registry entry is removed at reap) */
};

struct sessions {
    struct session s[MAX_SESSIONS];
    char buf[2 * MAX_REQUEST];  /* what came from the ctl port and is not a whole frame yet */
    size_t len;
};

static struct session *session_find(struct sessions *ss, unsigned long long sid)
{
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (ss->s[i].sid && ss->s[i].sid == sid)
            return &ss->s[i];
    return NULL;
}

/* Cut a session off: its helper sees the hang-up and kills the command; the slot is freed when it is reaped. */
static void session_cut(struct session *s)
{
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
}

static void session_reaped(pid_t pid, void *ctx)
{
    struct sessions *ss = ctx;
    for (int i = 0; i < MAX_SESSIONS; i++) {
        if (ss->s[i].sid && ss->s[i].pid == pid) {
            if (ss->s[i].ctr[0])
                container_gone(ss->s[i].ctr, pid);  /* a helper that died before removing it */
            session_cut(&ss->s[i]);
            ss->s[i].sid = 0;
        }
    }
}

/* "<sid> ENTER ..." or "<sid> CREATE ...": fork the session's helper (the request line is NUL-terminated). */
static void session_start(struct pod *pod, struct sessions *ss, int ctl, unsigned long long sid, char *line)
{
    struct session *free_slot = NULL;
    for (int i = 0; i < MAX_SESSIONS && !free_slot; i++)
        if (!ss->s[i].sid)
            free_slot = &ss->s[i];
    if (session_find(ss, sid)) {
        send_line(ctl, sid, "FAIL session%%20id%%20in%%20use");
        return;
    }
    if (!free_slot) {
        send_line(ctl, sid, "FAIL too%%20many%%20enter%%20sessions%%20(at%%20most%%20%d)", MAX_SESSIONS);
        return;
    }
    int sp[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) < 0) {
        send_line(ctl, sid, "FAIL socketpair");
        return;
    }
    int sndbuf = 2 * IN_WINDOW;  /* the kernel doubles it: room for a whole window with its per-message overhead */
    setsockopt(sp[0], SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf));
    pid_t pid = fork();
    if (pid == 0) {
        for (int i = 0; i < MAX_SESSIONS; i++)
            if (ss->s[i].sid && ss->s[i].fd >= 0)
                close(ss->s[i].fd);
        close(sp[0]);
        char *f[MAX_LIST];
        int n = split(line, f, MAX_LIST);
        if (!strcmp(f[0], "CREATE"))
            create_session(pod, ctl, sp[1], sid, f, n);
        enter_session(pod, ctl, sp[1], sid, f, n);
    }
    close(sp[1]);
    if (pid < 0) {
        close(sp[0]);
        send_line(ctl, sid, "FAIL fork");
        return;
    }
    fcntl(sp[0], F_SETFL, O_NONBLOCK);
    *free_slot = (struct session){.sid = sid, .pid = pid, .fd = sp[0]};
    char name[64];
    if (sscanf(line, "CREATE %47s", name) == 1 && ctr_name_ok(name))
        snprintf(free_slot->ctr, sizeof(free_slot->ctr), "%s", name);
}

/* Route the whole frames in ss->buf; keep a partial last one. */
static void route_frames(struct pod *pod, struct sessions *ss, int ctl)
{
    size_t used = 0;
    while (used < ss->len) {
        char *frame = ss->buf + used;
        char *nl = memchr(frame, '\n', ss->len - used);
        if (!nl)
            break;
        size_t hdr = (size_t)(nl - frame) + 1, n = 0;
        char *end = NULL;
        unsigned long long sid = strtoull(frame, &end, 10);
        char *kind = end && *end == ' ' ? end + 1 : NULL;
        if (kind && !strncmp(kind, "IN ", 3)) {
            n = strtoul(kind + 3, NULL, 10);
            if (n > MAX_IN_FRAME)
                n = 0, kind = NULL;  /* not from our host: the header line is dropped */
            else if (used + hdr + n > ss->len)
                break;  /* the payload is not all here yet */
        }
        used += hdr + n;
        if (!kind || !sid)
            continue;
        if (!strncmp(kind, "ENTER ", 6) || !strncmp(kind, "CREATE ", 7)) {
            *nl = 0;
            session_start(pod, ss, ctl, sid, kind);
            continue;
        }
        struct session *s = session_find(ss, sid);
        if (s && s->fd >= 0 && send(s->fd, kind, (size_t)(frame + hdr + n - kind), MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
            session_cut(s);  /* its helper is not taking input as the window promised */
    }
    memmove(ss->buf, ss->buf + used, ss->len - used);
    ss->len -= used;
    if (ss->len == sizeof(ss->buf))
        ss->len = 0;  /* a line longer than any request: not from our host agent */
}

/* The ctl port is readable: take what is there and route it. */
static void read_ctl(struct pod *pod, struct sessions *ss, int ctl)
{
    ssize_t r = read(ctl, ss->buf + ss->len, sizeof(ss->buf) - ss->len);
    if (r > 0) {
        ss->len += (size_t)r;
        route_frames(pod, ss, ctl);
    }
}

/* The host end of the ctl port closed: every session's client is gone. */
static void hang_up_sessions(struct sessions *ss)
{
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (ss->s[i].sid)
            session_cut(&ss->s[i]);
    ss->len = 0;
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
    static struct sessions ss;  /* the enter sessions (static: its buffer is large for PID 1's stack) */
    reap(pod, session_reaped, &ss);
    int in_up = 1;
    while (apps_running(pod) > 0 || relay->master >= 0) {
        struct pollfd p[5] = {{sfd, POLLIN, 0}, {-1, POLLIN, 0}, {-1, POLLIN, 0}, {relay->master, POLLIN, 0},
                              {relay->master >= 0 && in_up ? relay->in : -1, POLLIN, 0}};
        if (ctl >= 0 && ctl_up)
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
        reap(pod, session_reaped, &ss);
        ctl_up = !(p[1].fd >= 0 && (p[1].revents & POLLHUP) && !(p[1].revents & POLLIN));
        if (!ctl_up)
            hang_up_sessions(&ss);
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
        if (p[1].fd >= 0 && (p[1].revents & POLLIN))
            read_ctl(pod, &ss, ctl);
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
