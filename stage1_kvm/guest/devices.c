/*
 * kvmrkt guest init: devices. Loading the kernel modules listed in /kvmrkt/modules, finding virtio disks (by
 * serial) and virtio-serial ports (by name) in sysfs, and opening an app's root disk through dm-verity.
 *
 * Trust: the serials, names and verity root hashes come from the pod config (the host); the disks' contents are
 * checked block by block against the measured root hash when verity is configured.
 */
#include "init.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <stdint.h>
#include <linux/dm-ioctl.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>

/*
 * Load the modules listed in /kvmrkt/modules (kernels that are not built for kvmrkt, such as Debian's cloud
 * kernel), in order, each with the "<module>.<param>=<value>" options found on the kernel command line.
 */
void load_modules(void)
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
int find_device(const char *dir, const char *prefix, const char *attr, const char *want, char *out,
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
int open_port(const char *name, int flags)
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
int find_disk(const char *serial, char *out, size_t outlen)
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
int open_verity(struct app *a, const char *data_dev, char *out, size_t outlen)
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
