/*
 * kvmrkt guest init and agent (PID 1 inside every pod VM). This file: the boot sequence (main), leaving the
 * initramfs (reroot) and ending the VM (shutdown_vm); init.h lists the other parts and what they share.
 *
 * Role: mount each app's read-only erofs root (virtio-blk, found by serial) under a writable overlay held in
 * guest memory (or a 9p "rootshare"), mount the pod's volumes, configure the network, start the apps (stage2)
 * with their argv, environment, working directory and credentials, and talk to the host over virtio-serial ports.
 * The pod config (/kvmrkt/pod.cfg, version 6) and every message on every port (status, ctl, sig, app stdio,
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
#include "init.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>

static void shutdown_vm(void)
{
    status("DONE");
    sync();
    reboot(RB_AUTOBOOT);
    for (;;)
        pause();
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
    static struct pod pod;  /* the pod config, read once (parse_config); each app's run state */
    struct tty_relay relay = {.in = -1, .master = -1, .out = -1, .size = {.ws_row = 24, .ws_col = 80}};
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

    int status_fd = open_port("kvmrkt.status", O_WRONLY);
    status_set_fd(status_fd);
    int ctl = -1;
    if (status_fd >= 0 && template_mode() && (ctl = template_handoff()) < 0) {
        status("FATAL template%%20handoff%%20failed%%20(see%%20the%%20console%%20log)");
        shutdown_vm();
    }
    if (status_fd < 0 || parse_config("/kvmrkt/pod.cfg", &pod) < 0 || pod.napps == 0) {
        logmsg("no usable pod configuration; halting");
        status("FATAL bad%%20pod%%20configuration");
        shutdown_vm();
    }
    if (reroot() < 0) {
        status("FATAL cannot%%20leave%%20the%%20initramfs");
        shutdown_vm();
    }
    if (pod.hostname)
        sethostname(pod.hostname, strlen(pod.hostname));
    if (pod.interactive)
        relay.in = open_port("kvmrkt.in.0", O_RDONLY);
    status("READY");
    if (ctl < 0)
        ctl = open_port("kvmrkt.ctl", O_RDWR);
    int sig = open_port("kvmrkt.sig", O_RDWR);
    if (setup_network(pod.nics, pod.nnics) < 0) {
        status("FATAL network%%20setup%%20failed%%20(see%%20the%%20console%%20log)");
        shutdown_vm();
    }
    if (setup_volumes(&pod) < 0) {
        status("FATAL volume%%20setup%%20failed");
        shutdown_vm();
    }
    int ok[MAX_APPS];
    for (int i = 0; i < pod.napps; i++)
        ok[i] = setup_app(&pod, &pod.apps[i]) == 0;
    if (pod.hold) {
        int killed = wait_for_go(&relay, sig);
        for (int i = 0; killed && i < pod.napps; i++) {
            pod.apps[i].exit_code = 128 + killed;
            status("EXIT %s %d", pod.apps[i].name, 128 + killed);
        }
        if (killed)
            shutdown_vm();
    }
    for (int i = 0; i < pod.napps; i++) {
        if (ok[i]) {
            start_app(&pod, i, &relay);
        } else {
            pod.apps[i].exit_code = 125;
            status("EXIT %s 125", pod.apps[i].name);
        }
    }
    supervise(&pod, &relay, ctl, sig);
    shutdown_vm();
    return 0;
}
