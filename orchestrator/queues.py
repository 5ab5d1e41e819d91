"""The broker topology: one durable classic queue per step kind, with priorities (lanes).

Used by the settings (queues the workers declare and consume) and by the scheduler (the queue
it publishes to), so that both always declare the same arguments: RabbitMQ refuses a
redeclaration with other arguments.
"""

from kombu import Exchange, Queue

MAX_PRIORITY = 10


def broker_queue(name: str, prefix: str = "") -> Queue:
    full_name = prefix + name
    return Queue(
        full_name,
        Exchange(full_name, type="direct", durable=True),
        routing_key=full_name,
        durable=True,
        queue_arguments={"x-max-priority": MAX_PRIORITY},
    )
