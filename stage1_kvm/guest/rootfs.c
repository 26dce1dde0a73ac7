/*
 * kvmrkt guest init: each app's filesystem, made before it starts. The pod's volumes; the app's root (its erofs
 * image, through dm-verity when configured, or a 9p share, under a writable overlay in guest memory); its
 * minimal read-only /dev (the OCI defaults), its volume mounts (bound by its ns-init after the default mounts,
 * mount_volumes) and the pod's files (hostname, hosts, resolv.conf).
 *
 * Trust: the pod config is the host's; the root's contents are the image's (hostile): files are written with
 * RESOLVE_IN_ROOT and O_NOFOLLOW, the roots are nodev and /dev is read-only once made.
 */
#include "init.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <linux/openat2.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>

static int is_bind(const struct volume *v)
{
    return !strcmp(v->kind, "bind") || !strcmp(v->kind, "rbind");
}

/*
 * The pod's volumes under /kvmrkt/vol, and its shared export at SHARED_DIR (read-write: what the host bound
 * read-only there is read-only on the host); "bind"/"rbind" volumes are in the export already (the host bound
 * them there), and need it.
 */
int setup_volumes(const struct pod *pod)
{
    if (pod->shared && mount_at(pod->shared, SHARED_DIR, "9p", MS_NODEV,
                                "trans=virtio,version=9p2000.L,cache=none,msize=262144") < 0) {
        logmsg("the shared export: mount failed: %s", strerror(errno));
        return -1;
    }
    for (int i = 0; i < pod->nvols; i++) {
        if (is_bind(&pod->vols[i])) {
            if (!pod->shared) {
                logmsg("volume %s: a bind volume without the shared export", pod->vols[i].name);
                return -1;
            }
            continue;
        }
        char dir[PATH_MAX];
        snprintf(dir, sizeof(dir), "/kvmrkt/vol/%s", pod->vols[i].name);
        int rc;
        if (!strcmp(pod->vols[i].kind, "host")) {
            rc = mount_at(pod->vols[i].tag, dir, "9p", MS_NODEV | (pod->vols[i].ro ? MS_RDONLY : 0),
                          "trans=virtio,version=9p2000.L,cache=none,msize=262144");
        } else {
            rc = mount_at("tmpfs", dir, "tmpfs", MS_NODEV, "mode=0755");
        }
        if (rc < 0) {
            logmsg("volume %s: mount failed: %s", pod->vols[i].name, strerror(errno));
            return -1;
        }
    }
    return 0;
}

static int in_root(int root, const char *path, int flags)
{
    struct open_how how = {.flags = (unsigned long long)(flags | O_CLOEXEC),
                           .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS};
    return (int)syscall(SYS_openat2, root, *path ? path : ".", &how, sizeof(how));
}

/*
 * The mount point `target` in the app root, as an O_PATH descriptor, resolved inside the root (an image's symlinks
 * cannot lead the init's mounts out of it); missing components are made: directories, and an empty file last
 * when `dir` is 0 (a bound file).
 */
static int mount_point(const char *root, const char *target, int dir)
{
    char path[PATH_MAX];
    int rfd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC), fd = -1;
    if (rfd < 0)
        return -1;
    snprintf(path, sizeof(path), "/%s", target);
    size_t len = strlen(path);
    for (size_t i = 1; i <= len; i++) {
        if ((path[i] != '/' && path[i] != 0) || path[i - 1] == '/')
            continue;
        char c = path[i];
        path[i] = 0;
        fd = in_root(rfd, path, O_PATH);
        if (fd < 0 && errno == ENOENT) {
            char *slash = strrchr(path, '/');
            *slash = 0;
            int parent = in_root(rfd, path, O_PATH | O_DIRECTORY);
            *slash = '/';
            if (parent >= 0) {
                int f = -1;
                if (c || dir)
                    mkdirat(parent, slash + 1, 0755);
                else if ((f = openat(parent, slash + 1, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                                     0644)) >= 0)
                    close(f);
                close(parent);
            }
            fd = in_root(rfd, path, O_PATH);
        }
        path[i] = c;
        if (fd < 0 || !c)
            break;
        close(fd);
        fd = -1;
    }
    close(rfd);
    return fd;
}

/* Mount (or, with src NULL, remount) onto the mount point `target` of the app root, resolved inside it. */
static int mount_in_root(struct app *a, const char *src, const char *target, int dir, unsigned long flags)
{
    char at[64];
    int fd = mount_point(a->root, target, dir);
    if (fd < 0)
        return -1;
    snprintf(at, sizeof(at), "/proc/self/fd/%d", fd);
    int rc = mount(src, at, NULL, flags, NULL);
    close(fd);
    return rc;
}

/* Where a volume is in the VM: a bind volume in the shared export, the others under /kvmrkt/vol. */
static const char *volume_source(const struct volume *v, char *src, size_t len)
{
    if (is_bind(v))
        snprintf(src, len, "%s/%s", SHARED_DIR, v->tag);
    else
        snprintf(src, len, "/kvmrkt/vol/%s", v->name);
    return src;
}

static const struct volume *volume_named(const struct pod *pod, const char *name)
{
    for (int i = 0; i < pod->nvols; i++)
        if (!strcmp(pod->vols[i].name, name))
            return &pod->vols[i];
    return NULL;
}

/*
 * Write the pod's files (hostname, hosts, resolv.conf) into an app root. Paths resolve inside the root
 * (RESOLVE_IN_ROOT), and a symlink in the image at the file's own path is replaced, not followed.
 */
static int write_files(const struct pod *pod, struct app *a)
{
    int root = open(a->root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root < 0)
        return -1;
    for (int i = 0; i < pod->nfiles; i++) {
        char dir[PATH_MAX];
        snprintf(dir, sizeof(dir), "%s", pod->files[i].path + (pod->files[i].path[0] == '/'));
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
        write_all(fd, pod->files[i].content, strlen(pod->files[i].content));
        close(fd);
    }
    close(root);
    return 0;
}

/*
 * The app's /dev, as the OCI runtime spec's defaults (runc's): a small tmpfs holding only the default devices
 * (null, zero, full, random, urandom, tty; no virtio ports, no disks, no kmsg), the links fd, stdin, stdout,
 * stderr, ptmx -> pts/ptmx and core, a devpts instance of its own, shm, and a mount point for its mqueue (made
 * in its IPC namespace by ns_init). /dev/console only for an app on a terminal: start_app binds that terminal
 * onto it. Read-only once made, so a node the app makes (CAP_MKNOD) can only live on its nodev root, where it
 * cannot be opened.
 */
static int setup_dev(struct app *a)
{
    static const struct { const char *name; unsigned maj, min; } nodes[] = {
        {"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7}, {"random", 1, 8}, {"urandom", 1, 9}, {"tty", 5, 0},
    };
    static const struct { const char *name, *target; } links[] = {
        {"ptmx", "pts/ptmx"}, {"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"},
        {"stdout", "/proc/self/fd/1"}, {"stderr", "/proc/self/fd/2"}, {"core", "/proc/kcore"},
    };
    char dev[PATH_MAX], p[PATH_MAX];
    snprintf(dev, sizeof(dev), "%s/dev", a->root);
    if (mount_at("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k,nr_inodes=64") < 0)
        return app_error(a, "mounting /dev"), -1;
    for (size_t i = 0; i < sizeof(nodes) / sizeof(nodes[0]); i++) {
        snprintf(p, sizeof(p), "%s/%s", dev, nodes[i].name);
        if (mknod(p, S_IFCHR | 0666, makedev(nodes[i].maj, nodes[i].min)) < 0 || chmod(p, 0666) < 0)
            return app_error(a, "making /dev nodes"), -1;
    }
    for (size_t i = 0; i < sizeof(links) / sizeof(links[0]); i++) {
        snprintf(p, sizeof(p), "%s/%s", dev, links[i].name);
        if (symlink(links[i].target, p) < 0)
            return app_error(a, "making /dev links"), -1;
    }
    for (int i = 0; i < a->ndevices; i++) {  /* the app's own device nodes (linux.devices): this VM kernel's */
        snprintf(p, sizeof(p), "%s/%s", dev, a->devices[i].path + 5);  /* the host checked: "/dev/..." */
        char *slash = strrchr(p, '/');
        *slash = 0;
        int made = mkdirs(p, 0755);
        *slash = '/';
        mode_t type = a->devices[i].type == 'b' ? S_IFBLK : a->devices[i].type == 'p' ? S_IFIFO : S_IFCHR;
        mode_t mode = a->devices[i].mode & 07777;
        unlink(p);  /* one of the defaults above, named again: the bundle's wins */
        if (made < 0 || mknod(p, type | mode, makedev(a->devices[i].maj, a->devices[i].min)) < 0 ||
            chmod(p, mode) < 0 || chown(p, a->devices[i].uid, a->devices[i].gid) < 0)
            return app_error(a, a->devices[i].path), -1;
    }
    if (a->terminal) {  /* the mount point start_app binds the terminal onto */
        snprintf(p, sizeof(p), "%s/console", dev);
        int fd = open(p, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0)
            return app_error(a, "/dev/console"), -1;
        close(fd);
    }
    snprintf(p, sizeof(p), "%s/mqueue", dev);
    if (mkdir(p, 0755) < 0)
        return app_error(a, "/dev/mqueue"), -1;
    snprintf(p, sizeof(p), "%s/pts", dev);
    if (mount_at("devpts", p, "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5") < 0)
        return app_error(a, "mounting /dev/pts"), -1;
    snprintf(p, sizeof(p), "%s/shm", dev);
    if (mount_at("shm", p, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k") < 0)
        return app_error(a, "mounting /dev/shm"), -1;
    if (mount(NULL, dev, NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k,nr_inodes=64") < 0)
        return app_error(a, "making /dev read-only"), -1;
    return 0;
}

/* Where an app's mounts are made: /kvmrkt/apps/<app>, a container's (containers.c) CTR_DIR/<name>. */
static const char *app_dir(const struct app *a)
{
    return a->rootbind ? CTR_DIR : "/kvmrkt/apps";
}

/*
 * A container's root directory, bound from the shared export (`rootdir`: a path the host bound there, resolved
 * beneath the export without symlinks) onto `dir`; nodev, and read-only when `ro`.
 */
static int bind_rootdir(struct app *a, const char *dir, int ro)
{
    char at[64];
    int export = open(SHARED_DIR, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (export < 0)
        return -1;
    struct open_how how = {.flags = O_PATH | O_DIRECTORY | O_CLOEXEC,
                           .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS};
    int fd = (int)syscall(SYS_openat2, export, a->rootshare, &how, sizeof(how));
    close(export);
    if (fd < 0)
        return -1;
    snprintf(at, sizeof(at), "/proc/self/fd/%d", fd);
    int rc = mount_at(at, dir, NULL, MS_BIND, NULL);
    close(fd);
    if (rc == 0)
        rc = mount(NULL, dir, NULL, MS_BIND | MS_REMOUNT | MS_NODEV | (ro ? MS_RDONLY : 0), NULL);
    return rc;
}

/* A writable overlay, held in guest memory, over the app's read-only lower root (/kvmrkt/apps/<app>/lower). */
static int overlay_root(struct app *a)
{
    char lower[PATH_MAX], rw[PATH_MAX], data[3 * PATH_MAX];
    snprintf(lower, sizeof(lower), "%s/%s/lower", app_dir(a), a->name);
    snprintf(rw, sizeof(rw), "%s/%s/rw", app_dir(a), a->name);
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
    snprintf(lower, sizeof(lower), "%s/%s/lower", app_dir(a), a->name);
    if (a->rootbind) {
        if (bind_rootdir(a, a->rootshare_ro ? lower : a->root, a->rootshare_ro) < 0)
            return app_error(a, "binding the root directory from the shared export"), -1;
        return a->rootshare_ro ? overlay_root(a) : 0;
    }
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

int setup_app(const struct pod *pod, struct app *a)
{
    snprintf(a->root, sizeof(a->root), "%s/%s/root", app_dir(a), a->name);
    a->terminal = pod->tty && a == &pod->apps[0];
    if (setup_root(a) < 0)
        return -1;
    char dir[PATH_MAX];
    snprintf(dir, sizeof(dir), "%s/proc", a->root);  /* proc and sys: mounted by the app's ns-init (its PID */
    if (mkdirs(dir, 0555) < 0)                          /* namespace, the spec's mount order) */
        return app_error(a, "proc"), -1;
    snprintf(dir, sizeof(dir), "%s/sys", a->root);
    if (mkdirs(dir, 0555) < 0)
        return app_error(a, "sys"), -1;
    if (setup_dev(a) < 0)
        return -1;
    /* The volume mounts: checked, and their mount points made now (the root may be made read-only below). */
    for (int i = 0; i < a->nmounts; i++) {  /* The app's ns-init binds them: mount_volumes */
        const struct volume *v = volume_named(pod, a->mounts[i].vol);
        char src[PATH_MAX];
        struct stat st;
        if (!v) {
            errno = ENOENT;
            return app_error(a, "mount of an undefined volume"), -1;
        }
        if (stat(volume_source(v, src, sizeof(src)), &st) < 0)
            return app_error(a, "a volume's source"), -1;
        int fd = mount_point(a->root, a->mounts[i].target, S_ISDIR(st.st_mode));
        if (fd < 0)
            return app_error(a, "a volume's mount point"), -1;
        close(fd);
        a->mounts[i].v = v;
    }
    if (write_files(pod, a) < 0)
        return app_error(a, "writing /etc/hostname, /etc/hosts or /etc/resolv.conf"), -1;
    if (a->rootshare && a->rootshare_ro &&
        mount(NULL, a->root, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NODEV, NULL) < 0)
        return app_error(a, "making the root read-only"), -1;
    return 0;
}

/*
 * Bind the app's volumes onto their mount points (made by setup_app; resolved inside its root again) in the pod
 * config's order, each read-only one remounted read-only. Run by the app's ns-init in its own mount namespace
 * after the default mounts (/proc ... /sys), so its mount table lists them in the OCI spec's order. On failure
 * returns -1 with errno set and `why` naming the mount.
 */
int mount_volumes(struct app *a, char *why, size_t len)
{
    for (int i = 0; i < a->nmounts; i++) {
        const struct volume *v = a->mounts[i].v;
        char src[PATH_MAX];
        struct stat st;
        snprintf(why, len, "mounting volume %s at %s", v ? v->name : a->mounts[i].vol, a->mounts[i].target);
        if (!v) {  /* not checked by setup_app */
            errno = EINVAL;
            return -1;
        }
        if (stat(volume_source(v, src, sizeof(src)), &st) < 0 ||
            mount_in_root(a, src, a->mounts[i].target, S_ISDIR(st.st_mode), MS_BIND) < 0 ||
            (v->ro && mount_in_root(a, NULL, a->mounts[i].target, S_ISDIR(st.st_mode),
                                    MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NODEV) < 0))
            return -1;
    }
    return 0;
}
