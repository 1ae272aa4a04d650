"""The job queue: Redis Streams with one consumer group, at-least-once delivery, results stored with a TTL.

Why Redis Streams: gateways and workers scale apart, a job must survive the process that took it, and the queue's
length is what the cap and the autoscaler read. Every job belongs to the tenant that submitted it. Every state
change that touches more than one key is a Lua script, because a crash (or a Redis failover) between two commands
must not leave a job half changed. Entries are XDEL'd when acknowledged, so XLEN is the number of jobs queued or
running. Works with Redis >= 6.2 (XPENDING IDLE); ``lag`` in ``stats`` needs Redis >= 7.

The parts, each importing only those listed before it: ``connection`` (client, outages), ``keys`` (layout),
``stream`` (the group), ``blobs`` (packed values), ``admission`` (caps, submit), ``records`` (reads, deletes),
``leases`` (delivery, ownership), ``endings`` (complete, fail), ``dead_letters``, ``recovery`` (the janitor) and
``job_queue``, the facade that composes them. This module only re-exports what the rest of the service imports.
"""

from service.queue.connection import connect
from service.queue.job_queue import JobQueue
from service.queue.keys import new_job_id
from service.queue.leases import Delivery
from service.queue.records import TERMINAL

__all__ = ["TERMINAL", "Delivery", "JobQueue", "connect", "new_job_id"]
