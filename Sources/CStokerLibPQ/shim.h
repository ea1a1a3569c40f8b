#ifndef STOKER_CSTOKERLIBPQ_SHIM_H
#define STOKER_CSTOKERLIBPQ_SHIM_H

#include <libpq-fe.h>
/* Not exported by Swift's Glibc module; the session thread waits on one to be woken. */
#include <sys/eventfd.h>

#endif
