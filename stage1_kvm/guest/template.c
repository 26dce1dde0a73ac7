/*
 * kvmrkt guest init: VM templates (docs/guest-protocol.md §7). A template VM boots an initramfs that holds
 * /kvmrkt/template instead of a pod config; its init gets as far as a pod-independent init can, detaches the
 * devices whose identity a clone's QEMU decides (virtio-blk: capacity and serial; virtio-net: MAC), reports
 * "TEMPLATE" and waits on the ctl port. The host snapshots it there (QEMU migration to a file), and every clone
 * restored from that snapshot resumes inside template_handoff(), reads its pod from the ctl port, makes itself
 * unique, reattaches the devices (now probed from the clone's own command line) and boots the pod as usual.
 *
 * The handoff frame, the first bytes the host sends on the ctl port:
 *   "POD <config bytes> <seed: 128 hex digits> <realtime seconds> <realtime nanoseconds>\n" <config bytes>
 * The seed (64 bytes from the host's RNG) is mixed into the kernel's pool and the CRNG is reseeded before anything
 * else runs: every clone starts from the template's RNG state, which must never be used again. The wall clock is
 * set from the host's (a clone's clock would otherwise be the template's).
 *
 * Trust: the frame comes from the host (stage0) and is trusted like the pod config; it is still parsed with
 * bounds (a header of at most 256 bytes, a config of at most MAX_POD_CONFIG bytes), and a malformed one ends
 * the VM with a FATAL status.
 */
#include "init.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>
#include <linux/random.h>
#include <net/if.h>
#include <sys/socket.h>
#include <sys/stat.h>

#define MAX_POD_CONFIG (4 << 20)
#define SEED_BYTES 64
#define MAX_DETACHED 64

static const char *const detached_drivers[] = {"virtio_blk", "virtio_net"};
static struct { int driver; char dev[32]; } detached[MAX_DETACHED];
static int ndetached;

static int write_sysfs(const char *path, const char *value)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, value, strlen(value));
    int err = errno;
    close(fd);
    errno = err;
    return n == (ssize_t)strlen(value) ? 0 : -1;
}

/* "unbind" or "bind" every detached device (bind: the driver probes the clone's device, its capacity, serial and
 * MAC, as at a cold boot). */
static int rebind(const char *op)
{
    for (int i = 0; i < ndetached; i++) {
        char path[160];
        snprintf(path, sizeof(path), "/sys/bus/virtio/drivers/%s/%s", detached_drivers[detached[i].driver], op);
        if (write_sysfs(path, detached[i].dev) < 0)
            return logmsg("template: %s %s: %s", op, detached[i].dev, strerror(errno)), -1;
    }
    return 0;
}

/* virtioN in N's order: the order QEMU created the devices in (the host's order of disks and NICs). */
static int by_device_number(const void *a, const void *b)
{
    const char *x = ((const typeof(detached[0]) *)a)->dev, *y = ((const typeof(detached[0]) *)b)->dev;
    return atoi(x + 6) - atoi(y + 6);
}

/* Unbind every device of the drivers whose device identity differs per clone. */
static int detach_devices(void)
{
    for (int d = 0; d < (int)(sizeof(detached_drivers) / sizeof(detached_drivers[0])); d++) {
        char dir[128];
        snprintf(dir, sizeof(dir), "/sys/bus/virtio/drivers/%s", detached_drivers[d]);
        DIR *dh = opendir(dir);
        if (!dh)
            continue;  /* the driver has no device here */
        struct dirent *e;
        while ((e = readdir(dh))) {
            if (strncmp(e->d_name, "virtio", 6) || strlen(e->d_name) >= sizeof(detached[0].dev))
                continue;
            if (ndetached == MAX_DETACHED) {
                closedir(dh);
                return logmsg("template: too many devices"), -1;
            }
            detached[ndetached].driver = d;
            snprintf(detached[ndetached].dev, sizeof(detached[0].dev), "%s", e->d_name);
            ndetached++;
        }
        closedir(dh);
    }
    qsort(detached, (size_t)ndetached, sizeof(detached[0]), by_device_number);
    return rebind("unbind");
}

/* Read exactly `len` bytes from the ctl port. Until the host connects, a read returns 0 at once (the port is
 * "hung up"): look again every millisecond (the VM does nothing else meanwhile). */
static int read_exact(int fd, char *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t r = read(fd, buf + got, len - got);
        if (r < 0 && errno != EINTR && errno != EAGAIN)
            return -1;
        if (r == 0)
            nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
        got += r > 0 ? (size_t)r : 0;
    }
    return 0;
}

static int reseed(const char *hex)
{
    struct {
        int entropy_count;
        int buf_size;
        unsigned char buf[SEED_BYTES];
    } seed = {.entropy_count = SEED_BYTES * 8, .buf_size = SEED_BYTES};
    for (int i = 0; i < SEED_BYTES; i++) {
        int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        seed.buf[i] = (unsigned char)(hi << 4 | lo);
    }
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = ioctl(fd, RNDADDENTROPY, &seed) < 0 || ioctl(fd, RNDRESEEDCRNG) < 0 ? -1 : 0;
    close(fd);
    return rc;
}

static int digits(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return 0;
    return 1;
}

/*
 * Give the clone's NICs the pod's MACs, the n-th virtio-net device the n-th "net" line's: a NIC's MAC is device
 * state that the snapshot restores (the template's), not the clone's command line. Through the driver, so QEMU's
 * device takes it too (its receive filter).
 */
int template_set_macs(const struct pod *pod)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), n = 0;
    for (int i = 0; fd >= 0 && i < ndetached; i++) {
        if (strcmp(detached_drivers[detached[i].driver], "virtio_net"))
            continue;
        if (n == pod->nnics)
            return logmsg("template: more NICs than the pod has"), close(fd), -1;
        char dir[96];
        snprintf(dir, sizeof(dir), "/sys/bus/virtio/devices/%s/net", detached[i].dev);
        DIR *dh = opendir(dir);
        struct dirent *e = NULL;
        while (dh && (e = readdir(dh)) && e->d_name[0] == '.')
            ;
        struct ifreq ifr = {0};
        unsigned m[6];
        if (!e || strlen(e->d_name) >= IFNAMSIZ
            || sscanf(pod->nics[n].mac, "%2x:%2x:%2x:%2x:%2x:%2x", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5]) != 6) {
            if (dh)
                closedir(dh);
            return logmsg("template: no interface for NIC %d", n), close(fd), -1;
        }
        snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", e->d_name);
        closedir(dh);
        ifr.ifr_hwaddr.sa_family = 1;  /* ARPHRD_ETHER */
        for (int b = 0; b < 6; b++)
            ifr.ifr_hwaddr.sa_data[b] = (char)m[b];
        if (ioctl(fd, SIOCSIFHWADDR, &ifr) < 0)
            return logmsg("template: setting the MAC of %s: %s", ifr.ifr_name, strerror(errno)), close(fd), -1;
        n++;
    }
    if (fd >= 0)
        close(fd);
    return fd < 0 || n != pod->nnics ? (logmsg("template: the pod has %d NICs, the VM %d", pod->nnics, n), -1) : 0;
}

int template_mode(void)
{
    return access("/kvmrkt/template", F_OK) == 0;
}

int template_handoff(void)
{
    if (detach_devices() < 0)
        return -1;
    int ctl = open_port("kvmrkt.ctl", O_RDWR);
    if (ctl < 0)
        return -1;
    status("TEMPLATE");
    /* ---- a clone resumes here ---- */
    char line[257];
    size_t n = 0;
    while (n < sizeof(line) - 1) {
        if (read_exact(ctl, line + n, 1) < 0)
            return logmsg("template: reading the handoff: %s", strerror(errno)), close(ctl), -1;
        if (line[n++] == '\n')
            break;
    }
    line[n] = 0;
    char *f[6];
    if (!n || line[n - 1] != '\n' || (line[n - 1] = 0, split(line, f, 6)) != 5 || strcmp(f[0], "POD")
        || !digits(f[1]) || strlen(f[2]) != 2 * SEED_BYTES || !digits(f[3]) || !digits(f[4]))
        return logmsg("template: malformed handoff"), close(ctl), -1;
    long long size = atoll(f[1]);
    if (size <= 0 || size > MAX_POD_CONFIG)
        return logmsg("template: pod config of %lld bytes", size), close(ctl), -1;
    if (reseed(f[2]) < 0)
        return logmsg("template: reseeding the RNG: %s", strerror(errno)), close(ctl), -1;
    struct timespec now = {.tv_sec = atoll(f[3]), .tv_nsec = atol(f[4])};
    if (now.tv_nsec >= 1000000000L || clock_settime(CLOCK_REALTIME, &now) < 0)
        return logmsg("template: setting the clock: %s", strerror(errno)), close(ctl), -1;
    char *config = malloc((size_t)size);
    int fd = -1;
    if (!config || read_exact(ctl, config, (size_t)size) < 0
        || (fd = open("/kvmrkt/pod.cfg", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600)) < 0) {
        logmsg("template: receiving the pod config: %s", strerror(errno));
        free(config);
        close(ctl);
        return -1;
    }
    write_all(fd, config, (size_t)size);
    free(config);
    close(fd);
    if (rebind("bind") < 0) {
        close(ctl);
        return -1;
    }
    return ctl;
}
