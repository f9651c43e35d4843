// Umbrella header of the concurrency_limiter engine.
//
// Resource     a named pool of slots with a waiter queue (resource.h)
// Limiter      the registry, canonical order and default timeout (limiter.h)
// Permit       RAII holder of granted slots (permit.h)
// Acquisition  the callback-based wait that front ends build on (acquisition.h)
// DeadlineQueue one timer for many waiting acquisitions (deadline_queue.h)
// LimitAlgorithm what moves an adaptive resource's limit (limit.h)
// Priority     the four request classes, served and shed in order (priority.h)
#pragma once

#include "concurrency_limiter/acquisition.h"
#include "concurrency_limiter/deadline_queue.h"
#include "concurrency_limiter/limit.h"
#include "concurrency_limiter/limiter.h"
#include "concurrency_limiter/outcome.h"
#include "concurrency_limiter/permit.h"
#include "concurrency_limiter/priority.h"
#include "concurrency_limiter/resource.h"
#include "concurrency_limiter/resource_set.h"
#include "concurrency_limiter/host_resource.h"
#include "concurrency_limiter/statistics.h"
