"""What other programs use: the Python client and producer, and the `abstream` command."""

from abstream.clients.client import Client, arrow_ipc
from abstream.clients.producer import BufferFull, Delivery, Producer, ProducerClosed

__all__ = ["BufferFull", "Client", "Delivery", "Producer", "ProducerClosed", "arrow_ipc"]
