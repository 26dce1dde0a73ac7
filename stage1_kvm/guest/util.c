/*
 * kvmrkt guest init: helpers every part uses. Messages to the console (logmsg), the status port and its lines
 * (status, app_error, app_last_error), %-escaping as in docs/guest-protocol.md (escape, unescape, split), text made safe for a
 * terminal (visible), and making directories and mounts.
 *
 * Trust: what is escaped or made visible may come from an image (hostile); what is split comes from the host.
 */
#include "init.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/stat.h>

static int status_fd = -1;  /* the status port (kvmrkt.status), set once by main */

void logmsg(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("kvmrkt-init: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

void write_all(int fd, const char *buf, size_t len)
{
    int refused = 0;
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        if (n == 0) {  /* a virtio port whose queue refused the buffer: nothing was taken; again, for 5 s at most */
            if (++refused > 5000)
                return;
            usleep(1000);
            continue;
        }
        buf += n;
        len -= (size_t)n;
    }
}

/* %-escape bytes outside printable ASCII, spaces and '%' (the inverse of unescape()). */
void escape(const char *in, char *out, size_t outlen)
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
const char *visible(const char *in, char *out, size_t outlen)
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

void status_set_fd(int fd)
{
    status_fd = fd;
}

void status(const char *fmt, ...)
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

static char last_error[1024];  /* app_error's last message (a container's FAIL names it) */

const char *app_last_error(void)
{
    return last_error;
}

void app_error(struct app *a, const char *what)
{
    char *msg = last_error, esc[3200];
    snprintf(msg, sizeof(last_error), "%s: %s", what, strerror(errno));
    escape(msg, esc, sizeof(esc));
    status("ERROR %s %s", a->name, esc);
    logmsg("app %s: %s", a->name, msg);
}

int hexval(char c)
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
int split(char *line, char **fields, int max)
{
    int n = 0;
    char *save = NULL;
    for (char *tok = strtok_r(line, " \n", &save); tok && n < max; tok = strtok_r(NULL, " \n", &save))
        fields[n++] = unescape(tok);
    return n;
}

int mkdirs(const char *path, mode_t mode)
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

int mount_at(const char *src, const char *dir, const char *type, unsigned long flags, const char *data)
{
    if (mkdirs(dir, 0755) < 0)
        return -1;
    return mount(src, dir, type, flags, data);
}
