/*
 * kvmrkt guest init: the pod's network. Brings up loopback and each NIC of the pod config (found by MAC,
 * renamed, MTU, IPv4 addresses, exactly the host's routes), with the classic ioctls (no netlink).
 *
 * Trust: the NIC list comes from the pod config (the host); the apps share this network namespace later.
 */
#include "init.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

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
int setup_network(struct nic *nics, int nnics)
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
