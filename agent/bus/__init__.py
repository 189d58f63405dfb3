"""The AMQP bus (docs/protocol.md): signed, versioned RPC and events over RabbitMQ with kombu.

errors     the exception tree (local BusError, remote RemoteError and its wire types)
keys       the key file and HMAC-SHA256 signatures over canonical JSON
envelope   sealing and opening messages: size, JSON, shape, signature, time and replay checks
schemas    every method's body and result and every event body, as msgspec Structs
transport  exchange and queue names; the consumer and publisher threads (one connection each)
rpc        RpcServer (agents) and RpcClient (orchestrators, source agents)
events     EventPublisher and EventSubscriber
"""
