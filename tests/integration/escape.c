/*
 * Run inside a pod's app by tests/integration/test_jail.py: every way this app might reach the guest init, its
 * agent ports or another app's status. Prints one line per attempt, "<name> ok" when the attempt worked and
 * "<name> denied <errno name>" when it did not; exit status 0 either way (the test reads the lines).
 *
 * Built static by the test (gcc from `make setup`) and handed to the guest on a read-only host volume.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static void report(const char *what, long rc)
{
    if (rc >= 0)
        printf("%s ok\n", what);
    else
        printf("%s denied %s\n", what, strerrorname_np(errno));
}

/* The device number of the guest's virtio-serial status port, from sysfs (readable, but useless without a node). */
static int status_port(unsigned *maj, unsigned *min)
{
    for (int i = 0; i < 64; i++) {
        char path[128], name[64] = "", dev[32] = "";
        snprintf(path, sizeof(path), "/sys/class/virtio-ports/vport0p%d/name", i);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        if (fgets(name, sizeof(name), f) && !strncmp(name, "kvmrkt.status", 13)) {
            fclose(f);
            snprintf(path, sizeof(path), "/sys/class/virtio-ports/vport0p%d/dev", i);
            f = fopen(path, "r");
            if (f && fgets(dev, sizeof(dev), f) && sscanf(dev, "%u:%u", maj, min) == 2) {
                fclose(f);
                return 0;
            }
        }
        if (f)
            fclose(f);
    }
    return -1;
}

int main(int argc, char **argv)
{
    const char *victim = argc > 1 ? argv[1] : "victim";
    char line[128];
    snprintf(line, sizeof(line), "EXIT %s 0\n", victim);

    /* 1. Open a port node in /dev (there is none) or make one (CAP_MKNOD) and write a forged status line. */
    int fd = open("/dev/vport0p1", O_WRONLY);
    report("open-dev-port", fd);
    unsigned maj, min;
    if (status_port(&maj, &min) == 0) {
        long rc = mknod("/tmp/port", S_IFCHR | 0600, makedev(maj, min));
        report("mknod-port", rc);
        fd = rc < 0 ? -1 : open("/tmp/port", O_WRONLY);
        report("open-made-port", fd);
        if (fd >= 0)
            report("write-forged-exit", write(fd, line, strlen(line)));
        rc = mknod("/dev/shm/port", S_IFCHR | 0600, makedev(maj, min));
        fd = rc < 0 ? -1 : open("/dev/shm/port", O_WRONLY);
        report("open-port-in-shm", fd);
    } else {
        printf("status-port-not-found\n");
    }

    /* 2. Take a descriptor from PID 1 of this namespace (the app's ns-init) with pidfd_getfd. */
    int pidfd = (int)syscall(SYS_pidfd_open, 1, 0);
    report("pidfd-open-1", pidfd);
    int got = -1;
    for (int i = 0; pidfd >= 0 && i < 64 && got < 0; i++)
        got = (int)syscall(SYS_pidfd_getfd, pidfd, i, 0);
    report("pidfd-getfd", got);
    if (got >= 0)
        report("write-stolen-fd", write(got, line, strlen(line)));

    /* 3. ptrace PID 1 (the app's ns-init; the VM's init is not even visible). */
    report("ptrace-1", ptrace(PTRACE_ATTACH, 1, 0, 0));
    report("proc-1-is-ours", access("/proc/1/root/kvmrkt", F_OK) < 0 ? 0 : -1);

    /* 4. Mount and module loading. */
    report("mount-tmpfs", mount("x", "/mnt", "tmpfs", 0, NULL));
    report("finit-module", syscall(SYS_finit_module, 0, "", 0));
    report("kexec-load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    report("bpf", syscall(SYS_bpf, 0, NULL, 0));
    report("keyctl", syscall(SYS_keyctl, 0, 0, 0, 0, 0));
    report("open-by-handle", syscall(SYS_open_by_handle_at, AT_FDCWD, NULL, 0));
    fflush(stdout);
    return 0;
}
