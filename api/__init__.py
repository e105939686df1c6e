"""The recfleet gateway: a thin FastAPI app that turns user-id lists into jobs on RabbitMQ.

It never imports torch.
"""
