/*
 * kvmrkt guest init: reading the pod config (/kvmrkt/pod.cfg, version 6; the format is in docs/guest-protocol.md)
 * into a struct pod, including each app's seccomp filter (classic BPF in hex, compiled by the host).
 *
 * Trust: the pod config comes from the host (stage0) and is trusted; a config without the version this init
 * reads is refused (fail closed), and lines past a limit (MAX_*) are ignored.
 */
#include "init.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

int parse_config(const char *path, struct pod *pod)
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
            pod->hostname = fv[1];
        } else if (!strcmp(k, "shared") && n == 2) {
            pod->shared = fv[1];
        } else if (!strcmp(k, "tty") && n == 2) {
            pod->tty = atoi(fv[1]);
        } else if (!strcmp(k, "hold") && n == 2) {
            pod->hold = atoi(fv[1]);
        } else if (!strcmp(k, "interactive") && n == 2) {
            pod->interactive = atoi(fv[1]);
        } else if (!strcmp(k, "volume") && n == 5 && pod->nvols < MAX_VOLS) {
            pod->vols[pod->nvols++] = (struct volume){fv[1], fv[2], fv[3], atoi(fv[4])};
        } else if (!strcmp(k, "net") && n == 4 && pod->nnics < MAX_NICS) {
            pod->nics[pod->nnics++] = (struct nic){.name = fv[1], .mac = fv[2], .mtu = atoi(fv[3])};
        } else if (pod->nnics && !strcmp(k, "addr") && n == 3 && pod->nics[pod->nnics - 1].naddrs < MAX_ADDRS) {
            struct nic *c = &pod->nics[pod->nnics - 1];
            c->addrs[c->naddrs].ip = fv[1];
            c->addrs[c->naddrs++].prefix = atoi(fv[2]);
        } else if (pod->nnics && !strcmp(k, "route") && n == 4 && pod->nics[pod->nnics - 1].nroutes < MAX_ROUTES) {
            struct nic *c = &pod->nics[pod->nnics - 1];
            c->routes[c->nroutes].dst = fv[1];
            c->routes[c->nroutes].prefix = atoi(fv[2]);
            c->routes[c->nroutes++].gw = strcmp(fv[3], "-") ? fv[3] : NULL;
        } else if (!strcmp(k, "file") && n == 3 && pod->nfiles < MAX_FILES) {
            pod->files[pod->nfiles++] = (struct file){fv[1], fv[2]};
        } else if (!strcmp(k, "app") && n == 2 && pod->napps < MAX_APPS) {
            cur = &pod->apps[pod->napps++];
            memset(cur, 0, sizeof(*cur));
            cur->name = fv[1];
            cur->cwd = "/";
            cur->caps = 0;  /* the host always sends the set; without one the app gets no capability (fail closed) */
        } else if (cur && !strcmp(k, "rootshare") && n == 3) {
            cur->rootshare = fv[1];
            cur->rootshare_ro = atoi(fv[2]);
        } else if (cur && !strcmp(k, "rootdir") && n == 3) {  /* a container's (containers.c) */
            cur->rootshare = fv[1];
            cur->rootshare_ro = atoi(fv[2]);
            cur->rootbind = 1;
        } else if (cur && !strcmp(k, "join") && n == 2) {
            cur->join = fv[1];
        } else if (cur && !strcmp(k, "shm") && n == 2) {
            cur->shm = fv[1];
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
            cur->mounts[cur->nmounts++] = (struct mountspec){.vol = fv[1], .target = fv[2]};
        } else if (cur && !strcmp(k, "caps") && n == 2) {
            cur->caps = strtoull(fv[1], NULL, 16);
        } else if (cur && !strcmp(k, "capsets") && n == 5) {
            cur->capsets = 1;
            cur->cap_eff = strtoull(fv[1], NULL, 16);
            cur->cap_perm = strtoull(fv[2], NULL, 16);
            cur->cap_inh = strtoull(fv[3], NULL, 16);
            cur->cap_amb = strtoull(fv[4], NULL, 16);
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
        } else if (cur && !strcmp(k, "sysctl") && n == 3 && cur->nsysctls < MAX_SYSCTLS) {
            cur->sysctls[cur->nsysctls].name = fv[1];
            cur->sysctls[cur->nsysctls++].value = fv[2];
        } else if (cur && !strcmp(k, "oomscore") && n == 2) {
            cur->oom_set = 1;
            cur->oom_score_adj = atoi(fv[1]);
        } else if (cur && !strcmp(k, "device") && n == 8 && cur->ndevices < MAX_DEVICES && strchr("cbp", fv[2][0])) {
            int d = cur->ndevices++;
            cur->devices[d].path = fv[1];
            cur->devices[d].type = fv[2][0];
            cur->devices[d].maj = (unsigned)strtoul(fv[3], NULL, 10);
            cur->devices[d].min = (unsigned)strtoul(fv[4], NULL, 10);
            cur->devices[d].mode = (unsigned)strtoul(fv[5], NULL, 8);
            cur->devices[d].uid = (unsigned)strtoul(fv[6], NULL, 10);
            cur->devices[d].gid = (unsigned)strtoul(fv[7], NULL, 10);
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
