#define _GNU_SOURCE
#include "hp_net.h"
#include <time.h>

uint64_t hp_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#include <string.h>
#include <errno.h>
#include <sys/uio.h>
#include <linux/errqueue.h>
#include <netinet/ip_icmp.h>
#include <netinet/icmp6.h>

int hp_read_icmp_unreachable(int fd, struct sockaddr_storage *destination) {
    char payload[64];
    char control[512];
    struct iovec iov = { .iov_base = payload, .iov_len = sizeof(payload) };
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    memset(destination, 0, sizeof(*destination));
    msg.msg_name = destination;
    msg.msg_namelen = sizeof(*destination);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    if (recvmsg(fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) {
        return -1;
    }
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        int v4 = c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_RECVERR;
        int v6 = c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_RECVERR;
        if (!v4 && !v6) continue;
        struct sock_extended_err err;
        memcpy(&err, CMSG_DATA(c), sizeof(err));
        if (v4 && err.ee_origin == SO_EE_ORIGIN_ICMP && err.ee_type == ICMP_DEST_UNREACH) return 1;
        if (v6 && err.ee_origin == SO_EE_ORIGIN_ICMP6 && err.ee_type == ICMP6_DST_UNREACH) return 1;
    }
    return 0;
}
