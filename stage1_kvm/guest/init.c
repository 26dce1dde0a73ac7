/*
 * kvmrkt guest init and agent (PID 1 inside every pod VM).
 *
 * Role: mount each app's read-only erofs root (virtio-blk, found by serial) under a writable overlay held in
 * guest memory (or a 9p "rootshare"), mount the pod's volumes, configure the network, start the apps (stage2)
 * with their argv, environment, working directory and credentials, and talk to the host over virtio-serial ports.
 * The pod config (/kvmrkt/pod.cfg, version 2) and every message on every port (status, ctl, sig, app stdio,
 * console), with framing, limits and what the host believes, are documented in docs/guest-protocol.md: change
 * that document with the code. When every app has exited the VM is rebooted, which ends QEMU (-no-reboot).
 *
 * Confinement: each app runs in its own mount, PID, IPC and UTS namespaces (the pod's network namespace is
 * shared), pivot_root'ed into its root (mounted nodev), with a minimal read-only /dev (null, zero, full, random,
 * urandom, tty, console -> null, ptmx, pts, shm, mqueue; no ports or disks), its /proc masked and read-only
 * paths ("maskpath", "ropath"), its capability bounding set ("caps", a hex mask), its seccomp filter ("seccomp",
 * classic BPF in hex, compiled by the host), no_new_privs ("nnp") and rlimits ("rlimit"). PID 1 of each app's
 * namespace is a small forked init (ns-init: not dumpable, holding no descriptor of ours) that forwards signals to
 * the app and exits with its status; only this init (PID 1 of the VM) writes status lines, once per app.
 * Enter sessions join the app's namespaces (setns on its ns-init) and get the same confinement.
 *
 * Trust boundary: everything the host sends (pod config in /kvmrkt/pod.cfg, control requests) is trusted as
 * coming from stage0; the apps are not trusted: they cannot see this init or open the ports (each holds only its
 * own stdio ports), cannot open a device node they make, and nothing here reads data the apps can write, except
 * that an app can of course kill the VM it runs in.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <linux/capability.h>
#include <linux/dm-ioctl.h>
#include <linux/filter.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/sysmacros.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_APPS 32
#define MAX_VOLS 32
#define MAX_LIST 1024
#define MAX_NICS 8
#define MAX_ADDRS 8
#define MAX_ROUTES 32
#define MAX_FILES 16
#define MAX_PATHS 64
#define MAX_RLIMITS 16
#define POD_CONFIG_VERSION "2"

struct mountspec { char *vol; char *target; };

struct app {
    char *name;
    char *serial;           /* virtio-blk serial of the erofs image */
    char *verity_serial;    /* serial of its dm-verity hash tree (NULL: no verity) */
    char *verity_root;
    char *verity_salt;
    char *rootshare;        /* 9p tag of a host directory used as the root (NULL: erofs image) */
    int rootshare_ro;
    uid_t uid;
    gid_t gid;
    gid_t groups[64];
    int ngroups;
    char *cwd;
    char *argv[MAX_LIST];
    int argc;
    char *env[MAX_LIST];
    int envc;
    struct mountspec mounts[MAX_VOLS];
    int nmounts;
    unsigned long long caps;    /* capability bounding set */
    struct sock_filter *filter; /* seccomp (NULL: none) */
    unsigned short filter_len;
    int nnp;
    char *masked[MAX_PATHS];
    int nmasked;
    char *ropaths[MAX_PATHS];
    int nro;
    struct { int resource; rlim_t soft, hard; } rlimits[MAX_RLIMITS];
    int nrlimits;
    char root[PATH_MAX];
    pid_t pid;
    int running;
    int exit_code;
};

struct volume { char *name; char *kind; char *tag; int ro; };

struct nic {
    char *name, *mac;
    int mtu;
    struct { char *ip; int prefix; } addrs[MAX_ADDRS];
    int naddrs;
    struct { char *dst; int prefix; char *gw; } routes[MAX_ROUTES];  /* gw NULL: on-link */
    int nroutes;
};

struct file { char *path, *content; };

static struct app apps[MAX_APPS];
static int napps;
static struct volume vols[MAX_VOLS];
static int nvols;
static int interactive;
static int hold;
static int tty;
static int tty_master = -1, tty_out = -1;  /* app 0's terminal and the port its output goes to */
static struct winsize tty_size = {.ws_row = 24, .ws_col = 80};  /* until the host says ("WINSZ") */
static struct nic nics[MAX_NICS];
static int nnics;
static struct file files[MAX_FILES];
static int nfiles;
static char *hostname;
static int status_fd = -1;
static int stdin_fd = -1;  /* app 0's stdin port, opened at boot so host input is queued, not dropped */
static pid_t enter_pid;

static void logmsg(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("kvmrkt-init: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        buf += n;
        len -= (size_t)n;
    }
}

/* %-escape bytes outside printable ASCII, spaces and '%' (the inverse of unescape()). */
static void escape(const char *in, char *out, size_t outlen)
{
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)in; *p && o + 4 < outlen; p++) {
        if (*p <= 0x20 || *p >= 0x7f || *p == '%')
            o += (size_t)snprintf(out + o, outlen - o, "%%%02X", *p);
        else
            out[o++] = (char)*p;
    }
    out[o] = 0;
}

/* Text that came from an image or a pod config, as printable ASCII for messages on an app's stderr (which the
 * host copies to the operator's terminal): every other byte, and '\\', becomes \\xNN, so no terminal escape
 * sequence gets through (the host renders its own guest text the same way). */
static const char *visible(const char *in, char *out, size_t outlen)
{
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)in; *p && o + 5 < outlen; p++) {
        if (*p < 0x20 || *p >= 0x7f || *p == '\\')
            o += (size_t)snprintf(out + o, outlen - o, "\\x%02x", *p);
        else
            out[o++] = (char)*p;
    }
    out[o] = 0;
    return out;
}

static void status(const char *fmt, ...)
{
    char line[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof(line) - 2)
        n = sizeof(line) - 2;
    line[n++] = '\n';
    if (status_fd >= 0)
        write_all(status_fd, line, (size_t)n);
}

static void app_error(struct app *a, const char *what)
{
    char msg[1024], esc[3200];
    snprintf(msg, sizeof(msg), "%s: %s", what, strerror(errno));
    escape(msg, esc, sizeof(esc));
    status("ERROR %s %s", a->name, esc);
    logmsg("app %s: %s", a->name, msg);
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static char *unescape(const char *s)
{
    char *out = malloc(strlen(s) + 1), *o = out;
    if (!out)
        return NULL;
    if (!strcmp(s, "%")) {  /* the empty string */
        *out = 0;
        return out;
    }
    while (*s) {
        if (s[0] == '%' && s[1] && s[2] && hexval(s[1]) >= 0 && hexval(s[2]) >= 0) {
            *o++ = (char)(hexval(s[1]) * 16 + hexval(s[2]));
            s += 3;
        } else {
            *o++ = *s++;
        }
    }
    *o = 0;
    return out;
}

/* Split a line into at most max space-separated, unescaped fields; returns the count. */
static int split(char *line, char **fields, int max)
{
    int n = 0;
    char *save = NULL;
    for (char *tok = strtok_r(line, " \n", &save); tok && n < max; tok = strtok_r(NULL, " \n", &save))
        fields[n++] = unescape(tok);
    return n;
}

/* A seccomp filter in hex (struct sock_filter[], little endian, as the host compiled it). */
static int parse_filter(struct app *a, const char *hex)
{
    size_t len = strlen(hex);
    if (len == 0 || len % (2 * sizeof(struct sock_filter)) || len / 2 / sizeof(struct sock_filter) > BPF_MAXINSNS)
        return -1;
    unsigned char *buf = malloc(len / 2);
    if (!buf)
        return -1;
    for (size_t i = 0; i < len / 2; i++) {
        int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            free(buf);
            return -1;
        }
        buf[i] = (unsigned char)(hi * 16 + lo);
    }
    a->filter = (struct sock_filter *)buf;
    a->filter_len = (unsigned short)(len / 2 / sizeof(struct sock_filter));
    return 0;
}

static int parse_config(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        logmsg("cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    struct app *cur = NULL;
    int versioned = 0;
    while (getline(&line, &cap, f) > 0) {
        char *fv[8];
        int n = split(line, fv, 8);
        if (n == 0)
            continue;
        const char *k = fv[0];
        if (!strcmp(k, "version") && n == 2) {
            if (strcmp(fv[1], POD_CONFIG_VERSION)) {
                logmsg("unsupported pod config version %s", fv[1]);
                fclose(f);
                return -1;
            }
            versioned = 1;
        } else if (!strcmp(k, "hostname") && n == 2) {
            hostname = fv[1];
        } else if (!strcmp(k, "tty") && n == 2) {
            tty = atoi(fv[1]);
        } else if (!strcmp(k, "hold") && n == 2) {
            hold = atoi(fv[1]);
        } else if (!strcmp(k, "interactive") && n == 2) {
            interactive = atoi(fv[1]);
        } else if (!strcmp(k, "volume") && n == 5 && nvols < MAX_VOLS) {
            vols[nvols++] = (struct volume){fv[1], fv[2], fv[3], atoi(fv[4])};
        } else if (!strcmp(k, "net") && n == 4 && nnics < MAX_NICS) {
            nics[nnics++] = (struct nic){.name = fv[1], .mac = fv[2], .mtu = atoi(fv[3])};
        } else if (nnics && !strcmp(k, "addr") && n == 3 && nics[nnics - 1].naddrs < MAX_ADDRS) {
            struct nic *c = &nics[nnics - 1];
            c->addrs[c->naddrs].ip = fv[1];
            c->addrs[c->naddrs++].prefix = atoi(fv[2]);
        } else if (nnics && !strcmp(k, "route") && n == 4 && nics[nnics - 1].nroutes < MAX_ROUTES) {
            struct nic *c = &nics[nnics - 1];
            c->routes[c->nroutes].dst = fv[1];
            c->routes[c->nroutes].prefix = atoi(fv[2]);
            c->routes[c->nroutes++].gw = strcmp(fv[3], "-") ? fv[3] : NULL;
        } else if (!strcmp(k, "file") && n == 3 && nfiles < MAX_FILES) {
            files[nfiles++] = (struct file){fv[1], fv[2]};
        } else if (!strcmp(k, "app") && n == 2 && napps < MAX_APPS) {
            cur = &apps[napps++];
            memset(cur, 0, sizeof(*cur));
            cur->name = fv[1];
            cur->cwd = "/";
            cur->caps = 0;  /* the host always sends the set; without one the app gets no capability (fail closed) */
        } else if (cur && !strcmp(k, "rootshare") && n == 3) {
            cur->rootshare = fv[1];
            cur->rootshare_ro = atoi(fv[2]);
        } else if (cur && !strcmp(k, "serial") && n == 2) {
            cur->serial = fv[1];
        } else if (cur && !strcmp(k, "verity") && n == 4) {
            cur->verity_serial = fv[1];
            cur->verity_root = fv[2];
            cur->verity_salt = fv[3];
        } else if (cur && !strcmp(k, "uid") && n == 2) {
            cur->uid = (uid_t)strtoul(fv[1], NULL, 10);
        } else if (cur && !strcmp(k, "gid") && n == 2) {
            cur->gid = (gid_t)strtoul(fv[1], NULL, 10);
        } else if (cur && !strcmp(k, "group") && n == 2 && cur->ngroups < 64) {
            cur->groups[cur->ngroups++] = (gid_t)strtoul(fv[1], NULL, 10);
        } else if (cur && !strcmp(k, "cwd") && n == 2) {
            cur->cwd = fv[1];
        } else if (cur && !strcmp(k, "arg") && n == 2 && cur->argc < MAX_LIST - 1) {
            cur->argv[cur->argc++] = fv[1];
        } else if (cur && !strcmp(k, "env") && n == 2 && cur->envc < MAX_LIST - 1) {
            cur->env[cur->envc++] = fv[1];
        } else if (cur && !strcmp(k, "mount") && n == 3 && cur->nmounts < MAX_VOLS) {
            cur->mounts[cur->nmounts++] = (struct mountspec){fv[1], fv[2]};
        } else if (cur && !strcmp(k, "caps") && n == 2) {
            cur->caps = strtoull(fv[1], NULL, 16);
        } else if (cur && !strcmp(k, "seccomp") && n == 2) {
            if (parse_filter(cur, fv[1]) < 0) {
                logmsg("bad seccomp filter for app %s", cur->name);
                fclose(f);
                return -1;
            }
        } else if (cur && !strcmp(k, "nnp") && n == 2) {
            cur->nnp = atoi(fv[1]);
        } else if (cur && !strcmp(k, "maskpath") && n == 2 && cur->nmasked < MAX_PATHS) {
            cur->masked[cur->nmasked++] = fv[1];
        } else if (cur && !strcmp(k, "ropath") && n == 2 && cur->nro < MAX_PATHS) {
            cur->ropaths[cur->nro++] = fv[1];
        } else if (cur && !strcmp(k, "rlimit") && n == 4 && cur->nrlimits < MAX_RLIMITS) {
            cur->rlimits[cur->nrlimits].resource = atoi(fv[1]);
            cur->rlimits[cur->nrlimits].soft = (rlim_t)strtoull(fv[2], NULL, 10);
            cur->rlimits[cur->nrlimits++].hard = (rlim_t)strtoull(fv[3], NULL, 10);
        } else {
            logmsg("ignoring pod config line starting with %s", k);
        }
    }
    free(line);
    fclose(f);
    if (!versioned) { /* fail closed: a config that does not say its version may not mean what we read */
        logmsg("the pod config has no version line (this init reads version %s)", POD_CONFIG_VERSION);
        return -1;
    }
    return 0;
}

/*
 * Load the modules listed in /kvmrkt/modules (kernels that are not built for kvmrkt, such as Debian's cloud
 * kernel), in order, each with the "<module>.<param>=<value>" options found on the kernel command line.
 */
static void load_modules(void)
{
    FILE *f = fopen("/kvmrkt/modules", "r");
    if (!f)
        return;
    char cmdline[4096] = "";
    int cfd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    if (cfd >= 0) {
        ssize_t n = read(cfd, cmdline, sizeof(cmdline) - 1);
        cmdline[n > 0 ? n : 0] = 0;
        close(cfd);
    }
    char name[256];
    while (fgets(name, sizeof(name), f)) {
        name[strcspn(name, "\n")] = 0;
        if (!name[0])
            continue;
        char params[4096] = "", path[PATH_MAX], copy[4096], *save = NULL;
        size_t plen = strlen(name), used = 0;
        snprintf(copy, sizeof(copy), "%s", cmdline);
        for (char *tok = strtok_r(copy, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save))
            if (!strncmp(tok, name, plen) && tok[plen] == '.')
                used += (size_t)snprintf(params + used, sizeof(params) - used, "%s ", tok + plen + 1);
        snprintf(path, sizeof(path), "/lib/modules/%s.ko", name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || (syscall(SYS_finit_module, fd, params, 0) < 0 && errno != EEXIST))
            logmsg("loading module %s: %s", name, strerror(errno));
        if (fd >= 0)
            close(fd);
    }
    fclose(f);
}

/*
 * Find the device under `dir` (entries starting with `prefix`) whose sysfs attribute `attr` reads `want`, and
 * write its /dev path to `out`. Devices are announced asynchronously, so look again for up to 5 seconds.
 */
static int find_device(const char *dir, const char *prefix, const char *attr, const char *want, char *out,
                       size_t outlen)
{
    for (int i = 0; i < 2500; i++) {
        DIR *d = opendir(dir);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (strncmp(e->d_name, prefix, strlen(prefix)))
                continue;
            char p[PATH_MAX], buf[256];
            snprintf(p, sizeof(p), "%s/%s/%s", dir, e->d_name, attr);
            int fd = open(p, O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                continue;
            ssize_t n = read(fd, buf, sizeof(buf) - 1);
            close(fd);
            buf[n > 0 ? n : 0] = 0;
            buf[strcspn(buf, "\n")] = 0;
            if (n > 0 && !strcmp(buf, want)) {
                snprintf(out, outlen, "/dev/%s", e->d_name);
                closedir(d);
                return 0;
            }
        }
        if (d)
            closedir(d);
        usleep(2000);
    }
    errno = ENODEV;
    return -1;
}

/* Open the virtio-serial port with this name. */
static int open_port(const char *name, int flags)
{
    char path[PATH_MAX];
    int fd = -1;
    if (find_device("/sys/class/virtio-ports", "vport", "name", name, path, sizeof(path)) == 0)
        fd = open(path, flags | O_CLOEXEC);
    if (fd < 0)
        logmsg("virtio-serial port %s: %s", name, strerror(errno));
    return fd;
}

/* Find the block device whose virtio serial is `serial`. */
static int find_disk(const char *serial, char *out, size_t outlen)
{
    return find_device("/sys/block", "vd", "serial", serial, out, outlen);
}

static int dev_of(const char *devpath, unsigned *maj, unsigned *min, unsigned long long *sectors)
{
    struct stat st;
    if (stat(devpath, &st) < 0)
        return -1;
    *maj = major(st.st_rdev);
    *min = minor(st.st_rdev);
    char p[PATH_MAX], buf[64];
    snprintf(p, sizeof(p), "/sys/block/%s/size", devpath + 5);
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    buf[n > 0 ? n : 0] = 0;
    *sectors = strtoull(buf, NULL, 10);
    return 0;
}

static void dm_init(struct dm_ioctl *io, size_t size, const char *name)
{
    memset(io, 0, size);
    io->version[0] = DM_VERSION_MAJOR;
    io->version[1] = 0;
    io->version[2] = 0;
    io->data_size = (uint32_t)size;
    io->data_start = sizeof(struct dm_ioctl);
    snprintf(io->name, sizeof(io->name), "%s", name);
}

/*
 * Open an app's root through dm-verity (read-only, sha256, 4 KiB blocks, hash tree with a superblock on its
 * own disk), so every block the guest reads is checked against the measured root hash: an image altered on
 * the host after measurement reads as I/O errors. Writes the /dev/dm-N path to out.
 */
static int open_verity(struct app *a, const char *data_dev, char *out, size_t outlen)
{
    char hash_dev[PATH_MAX];
    unsigned dmaj, dmin, hmaj, hmin;
    unsigned long long sectors, hsectors;
    if (find_disk(a->verity_serial, hash_dev, sizeof(hash_dev)) < 0)
        return -1;
    if (dev_of(data_dev, &dmaj, &dmin, &sectors) < 0 || dev_of(hash_dev, &hmaj, &hmin, &hsectors) < 0)
        return -1;
    int ctl = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
    if (ctl < 0)
        return -1;
    char name[64];
    snprintf(name, sizeof(name), "kvmrkt-%s", a->name);
    union { struct dm_ioctl io; char buf[16384]; } u;
    dm_init(&u.io, sizeof(u), name);
    u.io.flags = DM_READONLY_FLAG;
    if (ioctl(ctl, DM_DEV_CREATE, &u.io) < 0)
        goto fail;
    unsigned dm_minor = minor(u.io.dev);
    dm_init(&u.io, sizeof(u), name);
    u.io.flags = DM_READONLY_FLAG;
    u.io.target_count = 1;
    struct dm_target_spec *spec = (struct dm_target_spec *)(u.buf + sizeof(struct dm_ioctl));
    spec->sector_start = 0;
    spec->length = sectors;
    snprintf(spec->target_type, sizeof(spec->target_type), "verity");
    char *params = (char *)(spec + 1);
    int plen = snprintf(params, sizeof(u) - sizeof(struct dm_ioctl) - sizeof(*spec),
                        "1 %u:%u %u:%u 4096 4096 %llu 1 sha256 %s %s", dmaj, dmin, hmaj, hmin, sectors / 8,
                        a->verity_root, a->verity_salt);
    spec->next = 0;
    u.io.data_size = (uint32_t)(sizeof(struct dm_ioctl) + sizeof(*spec) + (size_t)plen + 1);
    if (ioctl(ctl, DM_TABLE_LOAD, &u.io) < 0)
        goto fail;
    dm_init(&u.io, sizeof(u), name);
    if (ioctl(ctl, DM_DEV_SUSPEND, &u.io) < 0) /* without DM_SUSPEND_FLAG: resume, making the table live */
        goto fail;
    close(ctl);
    snprintf(out, outlen, "/dev/dm-%u", dm_minor);
    for (int i = 0; i < 500 && access(out, F_OK) < 0; i++)
        usleep(2000);
    return 0;
fail:
    close(ctl);
    return -1;
}

static int mkdirs(const char *path, mode_t mode)
{
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof(tmp), "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            if (mkdir(tmp, mode) < 0 && errno != EEXIST)
                return -1;
            *p = '/';
        }
    }
    if (mkdir(tmp, mode) < 0 && errno != EEXIST)
        return -1;
    return 0;
}

static int mount_at(const char *src, const char *dir, const char *type, unsigned long flags, const char *data)
{
    if (mkdirs(dir, 0755) < 0)
        return -1;
    return mount(src, dir, type, flags, data);
}

static int setup_volumes(void)
{
    for (int i = 0; i < nvols; i++) {
        char dir[PATH_MAX];
        snprintf(dir, sizeof(dir), "/kvmrkt/vol/%s", vols[i].name);
        int rc;
        if (!strcmp(vols[i].kind, "host")) {
            rc = mount_at(vols[i].tag, dir, "9p", MS_NODEV | (vols[i].ro ? MS_RDONLY : 0),
                          "trans=virtio,version=9p2000.L,cache=none,msize=262144");
        } else {
            rc = mount_at("kvmrkt-vol", dir, "tmpfs", MS_NODEV, "mode=0755");
        }
        if (rc < 0) {
            logmsg("volume %s: mount failed: %s", vols[i].name, strerror(errno));
            return -1;
        }
    }
    return 0;
}

static struct volume *volume_named(const char *name)
{
    for (int i = 0; i < nvols; i++)
        if (!strcmp(vols[i].name, name))
            return &vols[i];
    return NULL;
}

static void sin_set(struct sockaddr *sa, in_addr_t addr)
{
    struct sockaddr_in *sin = (struct sockaddr_in *)sa;
    memset(sin, 0, sizeof(*sin));
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = addr;
}

static in_addr_t mask_of(int prefix)
{
    return prefix <= 0 ? 0 : htonl(prefix >= 32 ? 0xffffffffu : ~(0xffffffffu >> prefix));
}

static int if_ioctl(int fd, unsigned long req, const char *name, struct ifreq *ifr)
{
    snprintf(ifr->ifr_name, IFNAMSIZ, "%s", name);
    return ioctl(fd, req, ifr);
}

static int if_up(int fd, const char *name)
{
    struct ifreq ifr = {0};
    if (if_ioctl(fd, SIOCGIFFLAGS, name, &ifr) < 0)
        return -1;
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    return if_ioctl(fd, SIOCSIFFLAGS, name, &ifr);
}

static int rename_if(int fd, const char *from, const char *to)
{
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_newname, IFNAMSIZ, "%s", to);
    return strcmp(from, to) ? if_ioctl(fd, SIOCSIFNAME, from, &ifr) : 0;
}

static int route_ioctl(int fd, unsigned long req, char *dev, in_addr_t dst, int prefix, const char *gw)
{
    struct rtentry rt;
    memset(&rt, 0, sizeof(rt));
    sin_set(&rt.rt_dst, dst & mask_of(prefix));
    sin_set(&rt.rt_genmask, mask_of(prefix));
    rt.rt_flags = RTF_UP | (prefix == 32 ? RTF_HOST : 0);
    if (gw) {
        in_addr_t g;
        if (inet_pton(AF_INET, gw, &g) != 1)
            return errno = EINVAL, -1;
        sin_set(&rt.rt_gateway, g);
        rt.rt_flags |= RTF_GATEWAY;
    }
    rt.rt_dev = dev;
    return ioctl(fd, req, &rt);
}

/* Configure one NIC (already renamed): MTU, addresses, then exactly the routes the host namespace had. */
static int configure_nic(int fd, struct nic *c)
{
    struct ifreq ifr = {0};
    ifr.ifr_mtu = c->mtu;
    if (c->mtu > 0 && if_ioctl(fd, SIOCSIFMTU, c->name, &ifr) < 0)
        return logmsg("%s: setting MTU %d: %s", c->name, c->mtu, strerror(errno)), -1;
    for (int i = 0; i < c->naddrs; i++) {
        char label[IFNAMSIZ];
        in_addr_t a;
        snprintf(label, sizeof(label), i ? "%s:%d" : "%s", c->name, i);
        if (inet_pton(AF_INET, c->addrs[i].ip, &a) != 1)
            return logmsg("%s: bad address %s", c->name, c->addrs[i].ip), -1;
        memset(&ifr, 0, sizeof(ifr));
        sin_set(&ifr.ifr_addr, a);
        if (if_ioctl(fd, SIOCSIFADDR, label, &ifr) < 0)
            return logmsg("%s: address %s: %s", label, c->addrs[i].ip, strerror(errno)), -1;
        sin_set(&ifr.ifr_netmask, mask_of(c->addrs[i].prefix));
        if (if_ioctl(fd, SIOCSIFNETMASK, label, &ifr) < 0)
            return logmsg("%s: netmask /%d: %s", label, c->addrs[i].prefix, strerror(errno)), -1;
    }
    if (if_up(fd, c->name) < 0)
        return logmsg("%s: up: %s", c->name, strerror(errno)), -1;
    /* The kernel added a subnet route per address; the host's list is authoritative (ptp has none). */
    for (int i = 0; i < c->naddrs; i++) {
        in_addr_t a;
        inet_pton(AF_INET, c->addrs[i].ip, &a);
        route_ioctl(fd, SIOCDELRT, c->name, a, c->addrs[i].prefix, NULL);
    }
    for (int i = 0; i < c->nroutes; i++) {
        in_addr_t d;
        if (inet_pton(AF_INET, c->routes[i].dst, &d) != 1 ||
            (route_ioctl(fd, SIOCADDRT, c->name, d, c->routes[i].prefix, c->routes[i].gw) < 0 && errno != EEXIST))
            return logmsg("%s: route %s/%d via %s: %s", c->name, c->routes[i].dst, c->routes[i].prefix,
                          c->routes[i].gw ? c->routes[i].gw : "link", strerror(errno)), -1;
    }
    return 0;
}

/* Bring up loopback and every NIC of the pod config, found by MAC (probe order is not relied on). */
static int setup_network(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || if_up(fd, "lo") < 0)
        return logmsg("loopback: %s", strerror(errno)), -1;
    char tmp[MAX_NICS][IFNAMSIZ];
    for (int i = 0; i < nnics; i++) {  /* two renames, so eth1 -> eth0 cannot collide with eth0 -> eth1 */
        char dev[PATH_MAX];
        if (find_device("/sys/class/net", "", "address", nics[i].mac, dev, sizeof(dev)) < 0)
            return logmsg("no network interface with MAC %s", nics[i].mac), close(fd), -1;
        snprintf(tmp[i], IFNAMSIZ, "kvnic%d", i);
        if (rename_if(fd, dev + strlen("/dev/"), tmp[i]) < 0)
            return logmsg("renaming %s: %s", dev + 5, strerror(errno)), close(fd), -1;
    }
    for (int i = 0; i < nnics; i++)
        if (rename_if(fd, tmp[i], nics[i].name) < 0 || configure_nic(fd, &nics[i]) < 0)
            return logmsg("network interface %s: %s", nics[i].name, strerror(errno)), close(fd), -1;
    close(fd);
    return 0;
}

/*
 * Write the pod's files (hostname, hosts, resolv.conf) into an app root. Paths resolve inside the root
 * (RESOLVE_IN_ROOT), and a symlink in the image at the file's own path is replaced, not followed.
 */
static int write_files(struct app *a)
{
    int root = open(a->root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root < 0)
        return -1;
    for (int i = 0; i < nfiles; i++) {
        char dir[PATH_MAX];
        snprintf(dir, sizeof(dir), "%s", files[i].path + (files[i].path[0] == '/'));
        char *slash = strrchr(dir, '/');
        const char *base = slash ? slash + 1 : dir;
        if (slash)
            *slash = 0;
        mkdirat(root, slash ? dir : ".", 0755);  /* the usual case: /etc exists, or is made here */
        struct open_how how = {.flags = O_PATH | O_DIRECTORY | O_CLOEXEC, .resolve = RESOLVE_IN_ROOT};
        int dfd = (int)syscall(SYS_openat2, root, slash ? dir : ".", &how, sizeof(how));
        if (dfd < 0) {
            close(root);
            return -1;
        }
        unlinkat(dfd, base, 0);
        int fd = openat(dfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
        close(dfd);
        if (fd < 0) {
            close(root);
            return -1;
        }
        write_all(fd, files[i].content, strlen(files[i].content));
        close(fd);
    }
    close(root);
    return 0;
}

/*
 * The app's /dev: a small tmpfs holding only harmless nodes (no virtio ports, no disks, console -> null), a
 * devpts instance of its own, shm, and a mount point for its mqueue; read-only once made, so a node the app makes
 * (CAP_MKNOD) can only live on its nodev root, where it cannot be opened.
 */
static int setup_dev(struct app *a)
{
    static const struct { const char *name; unsigned maj, min; mode_t mode; } nodes[] = {
        {"null", 1, 3, 0666}, {"zero", 1, 5, 0666}, {"full", 1, 7, 0666}, {"random", 1, 8, 0666},
        {"urandom", 1, 9, 0666}, {"tty", 5, 0, 0666}, {"console", 1, 3, 0666},
    };
    static const struct { const char *name, *target; } links[] = {
        {"ptmx", "pts/ptmx"}, {"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"},
        {"stdout", "/proc/self/fd/1"}, {"stderr", "/proc/self/fd/2"}, {"core", "/proc/kcore"},
    };
    char dev[PATH_MAX], p[PATH_MAX];
    snprintf(dev, sizeof(dev), "%s/dev", a->root);
    if (mount_at("kvmrkt-dev", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k,nr_inodes=64") < 0)
        return app_error(a, "mounting /dev"), -1;
    for (size_t i = 0; i < sizeof(nodes) / sizeof(nodes[0]); i++) {
        snprintf(p, sizeof(p), "%s/%s", dev, nodes[i].name);
        if (mknod(p, S_IFCHR | nodes[i].mode, makedev(nodes[i].maj, nodes[i].min)) < 0 || chmod(p, nodes[i].mode) < 0)
            return app_error(a, "making /dev nodes"), -1;
    }
    for (size_t i = 0; i < sizeof(links) / sizeof(links[0]); i++) {
        snprintf(p, sizeof(p), "%s/%s", dev, links[i].name);
        if (symlink(links[i].target, p) < 0)
            return app_error(a, "making /dev links"), -1;
    }
    snprintf(p, sizeof(p), "%s/mqueue", dev);
    if (mkdir(p, 0755) < 0)
        return app_error(a, "/dev/mqueue"), -1;
    snprintf(p, sizeof(p), "%s/pts", dev);
    if (mount_at("devpts", p, "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620") < 0)
        return app_error(a, "mounting /dev/pts"), -1;
    snprintf(p, sizeof(p), "%s/shm", dev);
    if (mount_at("shm", p, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0)
        return app_error(a, "mounting /dev/shm"), -1;
    if (mount(NULL, dev, NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k,nr_inodes=64") < 0)
        return app_error(a, "making /dev read-only"), -1;
    return 0;
}

/* A writable overlay, held in guest memory, over the app's read-only lower root (/kvmrkt/apps/<app>/lower). */
static int overlay_root(struct app *a)
{
    char lower[PATH_MAX], rw[PATH_MAX], data[3 * PATH_MAX];
    snprintf(lower, sizeof(lower), "/kvmrkt/apps/%s/lower", a->name);
    snprintf(rw, sizeof(rw), "/kvmrkt/apps/%s/rw", a->name);
    if (mount_at("kvmrkt-rw", rw, "tmpfs", 0, "mode=0755") < 0)
        return app_error(a, "mounting the overlay tmpfs"), -1;
    snprintf(data, sizeof(data), "%s/upper", rw);
    mkdir(data, 0755);
    snprintf(data, sizeof(data), "%s/work", rw);
    mkdir(data, 0755);
    snprintf(data, sizeof(data), "lowerdir=%s,upperdir=%s/upper,workdir=%s/work", lower, rw, rw);
    if (mount_at("overlay", a->root, "overlay", MS_NODEV, data) < 0)
        return app_error(a, "mounting the overlay root"), -1;
    return 0;
}

/*
 * The app's root: its erofs image (through dm-verity when configured) under an overlay; or a shared host
 * directory over 9p, read-write, or (read-only share) under an overlay too, so mount points can be made
 * without writing to the host; setup_app makes such a root read-only once everything is mounted.
 */
static int setup_root(struct app *a)
{
    char dev[PATH_MAX], lower[PATH_MAX];
    snprintf(lower, sizeof(lower), "/kvmrkt/apps/%s/lower", a->name);
    if (a->rootshare) {
        const char *opts = "trans=virtio,version=9p2000.L,cache=none,msize=262144";
        if (mount_at(a->rootshare, a->rootshare_ro ? lower : a->root, "9p",
                     MS_NODEV | (a->rootshare_ro ? MS_RDONLY : 0), opts) < 0)
            return app_error(a, "mounting the shared root directory"), -1;
        return a->rootshare_ro ? overlay_root(a) : 0;
    }
    if (find_disk(a->serial, dev, sizeof(dev)) < 0)
        return app_error(a, "root disk not found"), -1;
    if (a->verity_root) {
        char data_dev[PATH_MAX];
        snprintf(data_dev, sizeof(data_dev), "%s", dev);
        if (open_verity(a, data_dev, dev, sizeof(dev)) < 0)
            return app_error(a, "opening the root disk through dm-verity"), -1;
    }
    if (mount_at(dev, lower, "erofs", MS_RDONLY, NULL) < 0)
        return app_error(a, "mounting the erofs root"), -1;
    return overlay_root(a);
}

static int setup_app(struct app *a)
{
    snprintf(a->root, sizeof(a->root), "/kvmrkt/apps/%s/root", a->name);
    if (setup_root(a) < 0)
        return -1;
    char dir[PATH_MAX];
    snprintf(dir, sizeof(dir), "%s/proc", a->root);  /* mounted by the app's ns-init, in its PID namespace */
    if (mkdirs(dir, 0555) < 0)
        return app_error(a, "proc"), -1;
    snprintf(dir, sizeof(dir), "%s/sys", a->root);
    if (mount_at("sysfs", dir, "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, NULL) < 0)
        return app_error(a, "sys"), -1;
    if (setup_dev(a) < 0)
        return -1;
    for (int i = 0; i < a->nmounts; i++) {
        struct volume *v = volume_named(a->mounts[i].vol);
        char src[PATH_MAX], dst[PATH_MAX];
        if (!v) {
            errno = ENOENT;
            return app_error(a, "mount of an undefined volume"), -1;
        }
        snprintf(src, sizeof(src), "/kvmrkt/vol/%s", v->name);
        snprintf(dst, sizeof(dst), "%s/%s", a->root, a->mounts[i].target);
        if (mount_at(src, dst, NULL, MS_BIND, NULL) < 0)
            return app_error(a, "bind-mounting a volume"), -1;
        if (v->ro && mount(NULL, dst, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NODEV, NULL) < 0)
            return app_error(a, "remounting a volume read-only"), -1;
    }
    if (write_files(a) < 0)
        return app_error(a, "writing /etc/hostname, /etc/hosts or /etc/resolv.conf"), -1;
    if (a->rootshare && a->rootshare_ro &&
        mount(NULL, a->root, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NODEV, NULL) < 0)
        return app_error(a, "making the root read-only"), -1;
    return 0;
}

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
static void exec_app(struct app *a, char **argv, int in, int out, int err)
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
static void ns_init(struct app *a, int in, int out, int err)
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
static int open_terminal(struct app *a, int *peer)
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

static void start_app(int idx)
{
    struct app *a = &apps[idx];
    char name[64];
    snprintf(name, sizeof(name), "kvmrkt.out.%d", idx);
    int out = open_port(name, O_WRONLY);
    snprintf(name, sizeof(name), "kvmrkt.err.%d", idx);
    int err = open_port(name, O_WRONLY);
    int in = -1;
    if (interactive && idx == 0) {
        in = stdin_fd;
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
    if (tty && idx == 0) {
        int m = open_terminal(a, &term);
        if (m < 0) {
            app_error(a, "allocating a terminal");
            a->exit_code = 125;
            status("EXIT %s 125", a->name);
            return;
        }
        ioctl(m, TIOCSWINSZ, &tty_size);
        tty_master = m;
    }
    pid_t pid = (pid_t)syscall(SYS_clone, CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | SIGCHLD,
                               NULL, NULL, NULL, 0);
    if (pid == 0) {
        if (term >= 0)
            ns_init(a, term, term, term);
        ns_init(a, in, out, err);
    }
    if (term >= 0) {
        close(term);
        tty_out = out;  /* kept: the terminal's output is relayed to it, and stdin (in) to the terminal */
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

static struct app *app_named(const char *name)
{
    for (int i = 0; i < napps; i++)
        if (!strcmp(apps[i].name, name))
            return &apps[i];
    return NULL;
}

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
static void enter_session(int ctl, char **fields, int n)
{
    struct app *a = n >= 3 ? app_named(fields[1]) : NULL;
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

/* Signal every running app: its ns-init passes the signal on (SIGKILL ends its whole namespace). */
static void signal_apps(int sig)
{
    for (int i = 0; i < napps; i++)
        if (apps[i].running)
            kill(apps[i].pid, sig);
}

static int apps_running(void)
{
    int n = 0;
    for (int i = 0; i < napps; i++)
        n += apps[i].running;
    return n;
}

/* Copy what the app wrote to its terminal to the output port; when it has exited (done), drain and close. */
static void relay_terminal_output(int done)
{
    char buf[16384];
    ssize_t n = read(tty_master, buf, sizeof(buf));
    if (n > 0)
        write_all(tty_out, buf, (size_t)n);
    if (n <= 0 || done) {
        fcntl(tty_master, F_SETFL, O_NONBLOCK);
        while ((n = read(tty_master, buf, sizeof(buf))) > 0)
            write_all(tty_out, buf, (size_t)n);
        if (n < 0 && errno == EAGAIN && !done)
            return;
        close(tty_master);
        close(tty_out);
        tty_master = tty_out = -1;
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

static void reap(void)
{
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        if (pid == enter_pid) {
            enter_pid = 0;
            continue;
        }
        for (int i = 0; i < napps; i++) {
            if (apps[i].running && apps[i].pid == pid) {
                apps[i].running = 0;
                apps[i].exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
                status("EXIT %s %d", apps[i].name, apps[i].exit_code);
            }
        }
    }
}

static void shutdown_vm(void)
{
    status("DONE");
    sync();
    reboot(RB_AUTOBOOT);
    for (;;)
        pause();
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* "WINSZ <rows> <cols>": app 0's terminal size (the kernel signals the app's foreground group with SIGWINCH). */
static void set_tty_size(const char *rows, const char *cols)
{
    tty_size.ws_row = (unsigned short)atoi(rows);
    tty_size.ws_col = (unsigned short)atoi(cols);
    if (tty_master >= 0)
        ioctl(tty_master, TIOCSWINSZ, &tty_size);
}

static void supervise(int ctl, int sig)
{
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    long long kill_at = 0;
    int ctl_up = 1, sig_up = 1;
    reap();
    int in_up = 1;
    while (apps_running() > 0 || tty_master >= 0) {
        struct pollfd p[5] = {{sfd, POLLIN, 0}, {-1, POLLIN, 0}, {-1, POLLIN, 0}, {tty_master, POLLIN, 0},
                              {tty_master >= 0 && in_up ? stdin_fd : -1, POLLIN, 0}};
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
            relay_terminal_output(apps_running() == 0);
        if (p[4].revents & POLLIN) {
            char buf[4096];
            ssize_t n = read(stdin_fd, buf, sizeof(buf));
            if (n > 0)
                write_all(tty_master, buf, (size_t)n);
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
        reap();
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
                signal_apps(SIGTERM);
                kill_at = now_ms() + 1000LL * atoi(f[1]);
                write_all(sig, "OK\n", 3);
            } else if (n >= 2 && !strcmp(f[0], "KILL") && atoi(f[1]) > 0 && atoi(f[1]) < 65) {
                if (n == 3 && !strcmp(f[2], "all"))
                    kill(-1, atoi(f[1]));  /* from PID 1: every process but init itself */
                else
                    signal_apps(atoi(f[1]));
                write_all(sig, "OK\n", 3);
            } else if (n == 3 && !strcmp(f[0], "WINSZ")) {
                set_tty_size(f[1], f[2]);
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
                    enter_session(ctl, f, n);
                if (pid > 0)
                    enter_pid = pid;
            } else {
                write_all(ctl, "FAIL unknown%20request\n", 23);
            }
        }
        if (kill_at && now_ms() >= kill_at) {
            signal_apps(SIGKILL);
            kill_at = 0;
        }
    }
}

/* Report HELD, then wait on the sig port for GO (returns 0) or KILL <signal> (returns the signal). */
static int wait_for_go(int sig)
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
            set_tty_size(f[1], f[2]);
            write_all(sig, "OK\n", 3);
        } else if (n == 1 && !strcmp(f[0], "PING")) {
            write_all(sig, "PONG\n", 5);
        } else {
            write_all(sig, "FAIL not%20started\n", 19);
        }
    }
}

/* Remove everything from the initramfs (rootfs) but the directory `keep`, without crossing into mounts. */
static void empty_rootfs(int dfd, const char *keep)
{
    DIR *d = fdopendir(dfd);
    struct dirent *e;
    struct stat root, st;
    if (!d || fstat(dfd, &root) < 0) {
        if (d)
            closedir(d);
        return;
    }
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") || (keep && !strcmp(e->d_name, keep)))
            continue;
        if (fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || st.st_dev != root.st_dev)
            continue;
        if (S_ISDIR(st.st_mode)) {
            int sub = openat(dfd, e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (sub >= 0)
                empty_rootfs(sub, NULL);
            unlinkat(dfd, e->d_name, AT_REMOVEDIR);
        } else {
            unlinkat(dfd, e->d_name, 0);
        }
    }
    closedir(d);
}

/*
 * Leave the initramfs, as switch_root does: move /proc, /sys and /dev onto a fresh tmpfs, delete every file of the
 * initramfs (this binary, the pod config with every app's environment, modules), and make the tmpfs our root.
 * pivot_root(2) cannot leave the initramfs itself, but app namespaces can pivot_root away from a tmpfs root; and
 * what lies above every mount namespace's root is then an empty directory, not the pod config.
 */
static int reroot(void)
{
    if (mkdir("/newroot", 0755) < 0 || mount("kvmrkt-root", "/newroot", "tmpfs", MS_NOSUID, "mode=0755") < 0)
        return logmsg("reroot: %s", strerror(errno)), -1;
    static const char *moved[] = {"proc", "sys", "dev"};
    for (size_t i = 0; i < sizeof(moved) / sizeof(moved[0]); i++) {
        char from[64], to[64];
        snprintf(from, sizeof(from), "/%s", moved[i]);
        snprintf(to, sizeof(to), "/newroot/%s", moved[i]);
        if (mkdir(to, 0755) < 0 || mount(from, to, NULL, MS_MOVE, NULL) < 0)
            return logmsg("reroot: moving %s: %s", from, strerror(errno)), -1;
    }
    if (mkdir("/newroot/kvmrkt", 0755) < 0)
        return -1;
    empty_rootfs(open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC), "newroot");
    if (chdir("/newroot") < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 || chdir("/") < 0)
        return logmsg("reroot: %s", strerror(errno)), -1;
    return 0;
}

int main(void)
{
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    signal(SIGPIPE, SIG_IGN);

    mkdir("/proc", 0555);
    mkdir("/sys", 0555);
    mkdir("/dev", 0755);
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    int con = open("/dev/console", O_RDWR | O_CLOEXEC);
    if (con >= 0) {
        dup2(con, 1);
        dup2(con, 2);
    }
    setvbuf(stderr, NULL, _IONBF, 0);
    load_modules();

    status_fd = open_port("kvmrkt.status", O_WRONLY);
    if (status_fd < 0 || parse_config("/kvmrkt/pod.cfg") < 0 || napps == 0) {
        logmsg("no usable pod configuration; halting");
        status("FATAL bad%%20pod%%20configuration");
        shutdown_vm();
    }
    if (reroot() < 0) {
        status("FATAL cannot%%20leave%%20the%%20initramfs");
        shutdown_vm();
    }
    if (hostname)
        sethostname(hostname, strlen(hostname));
    if (interactive)
        stdin_fd = open_port("kvmrkt.in.0", O_RDONLY);
    status("READY");
    int ctl = open_port("kvmrkt.ctl", O_RDWR);
    int sig = open_port("kvmrkt.sig", O_RDWR);
    if (setup_network() < 0) {
        status("FATAL network%%20setup%%20failed%%20(see%%20the%%20console%%20log)");
        shutdown_vm();
    }
    if (setup_volumes() < 0) {
        status("FATAL volume%%20setup%%20failed");
        shutdown_vm();
    }
    int ok[MAX_APPS];
    for (int i = 0; i < napps; i++)
        ok[i] = setup_app(&apps[i]) == 0;
    if (hold) {
        int killed = wait_for_go(sig);
        for (int i = 0; killed && i < napps; i++) {
            apps[i].exit_code = 128 + killed;
            status("EXIT %s %d", apps[i].name, 128 + killed);
        }
        if (killed)
            shutdown_vm();
    }
    for (int i = 0; i < napps; i++) {
        if (ok[i]) {
            start_app(i);
        } else {
            apps[i].exit_code = 125;
            status("EXIT %s 125", apps[i].name);
        }
    }
    supervise(ctl, sig);
    shutdown_vm();
    return 0;
}
