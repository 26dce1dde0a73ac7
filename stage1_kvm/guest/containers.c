/*
 * kvmrkt guest init: containers inside a running pod VM (the CRI "pod sandbox = VM" model). A CREATE session
 * (agent.c routes "<sid> CREATE <name> [tty] [stdin]") is run by a helper forked by PID 1: it reads the
 * container's config from the shared export (SHARED_DIR/ctr/<name>.cfg, the pod config format with exactly one
 * app and its `rootdir`), sets the container up like an app in a mount namespace of its own (so nothing it
 * mounts reaches PID 1's), answers HELD, and on GO starts it under an ns-init (apps.c) in new mount and PID
 * namespaces, in the IPC and UTS namespaces of the app it `join`s, with that app's /dev/shm when `shm` names it;
 * then it relays the container's stdio like an enter session (agent.c:session_relay) and, when its ns-init
 * exits, detaches what it mounted, removes the registry entry and answers EXIT. The registry
 * (CTR_RUN/<name>.pid: "<helper pid> <ns-init pid>", in the VM's root tmpfs, not in the export) lets an ENTER
 * find a running container (container_named) and keeps a name from running twice.
 *
 * Trust: the config and the frames come from the host (stage0) and are trusted, but a name or path in them is
 * still checked (names [a-z0-9-]{1,40}; rootdir and bind tags relative, without "..", resolved beneath the export
 * without symlinks) so that a mistake cannot reach outside the export. The container is hostile, as an app is.
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
#include <unistd.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/syscall.h>

#define CTR_CONFIGS SHARED_DIR "/ctr"

int ctr_name_ok(const char *name)
{
    size_t len = strlen(name);
    if (len < 1 || len > 40)
        return 0;
    return strspn(name, "abcdefghijklmnopqrstuvwxyz0123456789-") == len;
}

/* A relative path without "." or ".." components, empty components or a leading '/'. */
static int path_ok(const char *path)
{
    if (!*path || *path == '/')
        return 0;
    for (const char *c = path; *c;) {
        size_t len = strcspn(c, "/");
        if (len == 0 || (len == 1 && c[0] == '.') || (len == 2 && c[0] == '.' && c[1] == '.'))
            return 0;
        c += len + (c[len] == '/');
    }
    return 1;
}

static void registry_path(const char *name, char *out, size_t len)
{
    snprintf(out, len, "%s/%s.pid", CTR_RUN, name);
}

/* The registry entry: the helper's pid and the container's ns-init (0: not started); 0 if it is there. */
static int registry_read(const char *name, pid_t *helper, pid_t *nspid)
{
    char path[PATH_MAX], buf[64] = {0};
    registry_path(name, path, sizeof(path));
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return -1;
    ssize_t r = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    int h = 0, p = 0;
    if (r <= 0 || sscanf(buf, "%d %d", &h, &p) != 2)
        return -1;
    *helper = h;
    *nspid = p;
    return 0;
}

/* Write the entry: new (O_EXCL: -1 with EEXIST when the name is taken), or replaced at once (rename). */
static int registry_write(const char *name, pid_t nspid, int create)
{
    char path[PATH_MAX], tmp[PATH_MAX], line[64];
    registry_path(name, path, sizeof(path));
    snprintf(tmp, sizeof(tmp), "%s/.%s.tmp", CTR_RUN, name);
    if (mkdirs(CTR_RUN, 0700) < 0)
        return -1;
    int fd = open(create ? path : tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0 && !create && errno == EEXIST && unlink(tmp) == 0)
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    int n = snprintf(line, sizeof(line), "%d %d\n", (int)getpid(), (int)nspid);
    write_all(fd, line, (size_t)n);
    close(fd);
    return create ? 0 : rename(tmp, path);
}

/* PID 1 reaped a CREATE helper: its registry entry goes, unless a newer helper of that name owns it now. */
void container_gone(const char *name, pid_t helper)
{
    pid_t h = 0, p = 0;
    char path[PATH_MAX];
    registry_path(name, path, sizeof(path));
    if (registry_read(name, &h, &p) == 0 && h == helper)
        unlink(path);
}

/*
 * Read and check a container's config into `c` (heap, its own), against the pod's apps and volumes (`pod`; NULL:
 * not checked again); NULL, or why not (for a FAIL). The app takes the container's name (its mount points and
 * messages use it).
 */
static const char *load_container(const struct pod *pod, const char *name, struct pod *c, char *why, size_t len)
{
    char path[PATH_MAX];
    if (!ctr_name_ok(name))
        return "bad container name (want [a-z0-9-], 1 to 40 characters)";
    snprintf(path, sizeof(path), "%s/%s.cfg", CTR_CONFIGS, name);
    if (access(path, R_OK) < 0) {
        snprintf(why, len, "its config %s: %s", path, strerror(errno));
        return why;
    }
    if (parse_config(path, c) < 0)
        return "its config is not valid (version, seccomp; see the console log)";
    if (c->napps != 1)
        return "its config must have exactly one app";
    struct app *a = &c->apps[0];
    if (!a->rootbind)
        return "its config has no rootdir";
    if (!path_ok(a->rootshare))
        return "its rootdir must be a relative path in the export, without . or ..";
    if (pod && a->join && !app_named((struct pod *)pod, a->join))
        return "the app it joins is not an app of the pod";
    if (pod && a->shm && !app_named((struct pod *)pod, a->shm))
        return "the app whose /dev/shm it shares is not an app of the pod";
    for (int i = 0; i < c->nvols; i++) {
        const struct volume *v = &c->vols[i];
        int bind = !strcmp(v->kind, "bind") || !strcmp(v->kind, "rbind");
        if (!bind && strcmp(v->kind, "empty"))
            return "a container volume must be of kind empty, bind or rbind";
        if (!path_ok(v->name) || strchr(v->name, '/') || (bind && !path_ok(v->tag)))
            return "a volume's name or export path is not a plain relative path";
        for (int j = 0; pod && j < pod->nvols; j++)
            if (!strcmp(pod->vols[j].name, v->name))
                return "a volume is named as one of the pod's";
    }
    a->name = (char *)name;
    return NULL;
}

/* For an ENTER: the running container `name`, with its confinement, and its ns-init's pid; NULL if none. */
struct app *container_named(const char *name, pid_t *pid)
{
    pid_t helper = 0, nspid = 0;
    char why[512];
    if (!ctr_name_ok(name) || registry_read(name, &helper, &nspid) < 0 || nspid <= 0)
        return NULL;
    struct pod *c = calloc(1, sizeof(*c));
    if (!c || load_container(NULL, name, c, why, sizeof(why)))
        return NULL;
    *pid = nspid;
    return &c->apps[0];
}

/* Everything the helper mounted for the container, detached (its subtree with it), and its mount points gone. */
static void teardown(struct pod *c)
{
    struct app *a = &c->apps[0];
    static const char *parts[] = {"root", "lower", "rw"};
    char p[PATH_MAX];
    for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
        snprintf(p, sizeof(p), "%s/%s/%s", CTR_DIR, a->name, parts[i]);
        umount2(p, MNT_DETACH);
        rmdir(p);
    }
    snprintf(p, sizeof(p), "%s/%s", CTR_DIR, a->name);
    rmdir(p);
    for (int i = 0; i < c->nvols; i++) {
        if (strcmp(c->vols[i].kind, "empty"))
            continue;
        snprintf(p, sizeof(p), "/kvmrkt/vol/%s", c->vols[i].name);
        umount2(p, MNT_DETACH);
        rmdir(p);
    }
}

/* The container's tmpfs volumes (/kvmrkt/vol/<volume>); its bind volumes are in the export already. */
static int container_volumes(struct pod *c)
{
    for (int i = 0; i < c->nvols; i++) {
        char dir[PATH_MAX];
        if (strcmp(c->vols[i].kind, "empty"))
            continue;
        snprintf(dir, sizeof(dir), "/kvmrkt/vol/%s", c->vols[i].name);
        if (mount_at("tmpfs", dir, "tmpfs", MS_NODEV | MS_NOSUID, "mode=0755") < 0)
            return -1;
    }
    return 0;
}

/* Its /dev/shm: the tmpfs of app `from`'s (as PID 1 mounted it under that app's root). */
static int share_shm(struct app *a, const struct app *from)
{
    char src[PATH_MAX], dst[PATH_MAX];
    snprintf(src, sizeof(src), "%s/dev/shm", from->root);
    snprintf(dst, sizeof(dst), "%s/dev/shm", a->root);
    if (!from->root[0] || umount2(dst, MNT_DETACH) < 0)
        return -1;
    return mount(src, dst, NULL, MS_BIND, NULL);
}

static void fail(int ctl, unsigned long long sid, struct pod *c, const char *name, const char *step,
                 const char *why) __attribute__((noreturn));
static void fail(int ctl, unsigned long long sid, struct pod *c, const char *name, const char *step,
                 const char *why)
{
    char msg[1200], esc[3700];
    snprintf(msg, sizeof(msg), "container %s: %s: %s", name, step, why);
    escape(msg, esc, sizeof(esc));
    if (c) {
        teardown(c);
        container_gone(name, getpid());
    }
    logmsg("%s", msg);
    send_line(ctl, sid, "FAIL %s", esc);
    _exit(0);
}

static void finish(int ctl, unsigned long long sid, struct pod *c, int code) __attribute__((noreturn));
static void finish(int ctl, unsigned long long sid, struct pod *c, int code)
{
    teardown(c);
    container_gone(c->apps[0].name, getpid());
    send_line(ctl, sid, "EXIT %d", code);
    _exit(0);
}

/*
 * Held: frames until GO (returns 0); "SIG n" returns n (the container ends with 128+n, no process ran), a hang-up
 * SIGKILL; input and terminal sizes are kept for later (session_frame).
 */
static int wait_go(int sp, struct session_input *si, int in, int tty)
{
    char msg[16384 + 64];
    for (;;) {
        ssize_t r = recv(sp, msg, sizeof(msg) - 1, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return SIGKILL;
        msg[r] = 0;
        if (!strcmp(msg, "GO\n"))
            return 0;
        if (!strncmp(msg, "SIG ", 4) && atoi(msg + 4) > 0 && atoi(msg + 4) < 65)
            return atoi(msg + 4);
        session_frame(si, msg, (size_t)r, in, tty, 0);
        if (session_hup(si))
            return SIGKILL;
    }
}

void create_session(struct pod *pod, int ctl, int sp, unsigned long long sid, char **fields, int n)
{
    const char *name = n >= 2 ? fields[1] : "";
    int want_tty = 0, want_in = 0;
    for (int i = 2; i < n; i++) {
        want_tty |= !strcmp(fields[i], "tty");
        want_in |= !strcmp(fields[i], "stdin");
    }
    char why[PATH_MAX + 128];
    struct pod *c = calloc(1, sizeof(*c));
    struct session_input *si = session_input_new();
    if (!c || !si)
        fail(ctl, sid, NULL, name, "memory", strerror(ENOMEM));
    status_set_fd(-1);  /* a container's errors go to its FAIL, not to the pod's status */
    const char *bad = load_container(pod, name, c, why, sizeof(why));
    if (bad)
        fail(ctl, sid, NULL, ctr_name_ok(name) ? name : "(refused name)", "loading its config", bad);
    if (registry_write(name, 0, 1) < 0)
        fail(ctl, sid, NULL, name, "registering it", errno == EEXIST ? "a container of that name exists"
                                                                          : strerror(errno));
    if (unshare(CLONE_NEWNS) < 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        fail(ctl, sid, c, name, "a mount namespace of its own", strerror(errno));
    struct app *a = &c->apps[0];
    c->tty = want_tty;
    c->shared = NULL;
    if (container_volumes(c) < 0)
        fail(ctl, sid, c, name, "mounting its volumes", strerror(errno));
    if (setup_app(c, a) < 0)
        fail(ctl, sid, c, name, "setting it up", app_last_error());
    if (a->shm && share_shm(a, app_named(pod, a->shm)) < 0)
        fail(ctl, sid, c, name, "binding the /dev/shm of the app it shares", strerror(errno));
    int po[2] = {-1, -1}, pe[2] = {-1, -1}, pi[2] = {-1, -1}, term = -1, in = -1, tty = -1;
    if (want_tty) {
        char fdpath[64], console[PATH_MAX];
        int m = open_terminal(a, &term);
        snprintf(fdpath, sizeof(fdpath), "/proc/self/fd/%d", term);
        snprintf(console, sizeof(console), "%s/dev/console", a->root);
        if (m < 0 || mount(fdpath, console, NULL, MS_BIND, NULL) < 0)  /* /dev/console is its terminal */
            fail(ctl, sid, c, name, "its terminal", strerror(errno));
        struct winsize ws = {.ws_row = 24, .ws_col = 80};
        ioctl(m, TIOCSWINSZ, &ws);
        po[0] = in = tty = m;
    } else if (pipe2(po, O_CLOEXEC) < 0 || pipe2(pe, O_CLOEXEC) < 0 || (want_in && pipe2(pi, O_CLOEXEC) < 0)) {
        fail(ctl, sid, c, name, "pipes", strerror(errno));
    } else if (want_in) {
        in = pi[1];
    }
    send_line(ctl, sid, "HELD");
    int killed = wait_go(sp, si, in, tty);
    if (killed)
        finish(ctl, sid, c, 128 + killed);
    struct app *j = a->join ? app_named(pod, a->join) : NULL;
    int jfd = j && j->running ? (int)syscall(SYS_pidfd_open, j->pid, 0) : -1;
    if (j && (jfd < 0 || setns(jfd, CLONE_NEWIPC | CLONE_NEWUTS) < 0))
        fail(ctl, sid, c, name, "joining the IPC and UTS namespaces of its app", "the app is not running");
    if (jfd >= 0)
        close(jfd);
    a->argv[a->argc] = NULL;
    a->env[a->envc] = NULL;
    pid_t pid = (pid_t)syscall(SYS_clone, CLONE_NEWNS | CLONE_NEWPID | (j ? 0 : CLONE_NEWIPC | CLONE_NEWUTS) |
                               SIGCHLD, NULL, NULL, NULL, 0);
    if (pid == 0) {
        if (term >= 0)
            ns_init(a, NULL, term, term, term);
        ns_init(a, NULL, want_in ? pi[0] : open("/dev/null", O_RDONLY | O_CLOEXEC), po[1], pe[1]);
    }
    if (pid < 0)
        fail(ctl, sid, c, name, "starting it", strerror(errno));
    if (term >= 0)
        close(term);
    close(po[1]);
    close(pe[1]);
    close(pi[0]);
    registry_write(name, pid, 0);
    send_line(ctl, sid, "STARTED %d", (int)pid);
    finish(ctl, sid, c, session_relay(ctl, sp, sid, si, po[0], pe[0], in, tty, pid, pid));
}
