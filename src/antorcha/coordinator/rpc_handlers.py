"""Registers the Coordinator service on a gRPC server with our own request decoding, so that:
- a request whose bytes are not a valid protobuf of the method's type is answered INVALID_ARGUMENT
  with what failed to parse (gRPC's generated registration would answer INTERNAL);
- the raw request bytes reach the guard, which checks the worker's signature over exactly those bytes;
- every call passes the servicer's `guard_call` (auth, rate limits) before the method runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]


@dataclass(frozen=True)
class Incoming:
    """A request as it came off the wire: decoded (or the decode error) and its raw bytes."""

    message: Message | None
    raw: bytes
    error: str = ""


def _decoder(cls: type[Message]) -> Callable[[bytes], Incoming]:
    def decode(raw: bytes) -> Incoming:
        try:
            return Incoming(cls.FromString(raw), raw)
        except (DecodeError, ValueError, RuntimeError) as e:
            return Incoming(None, raw, str(e) or type(e).__name__)

    return decode


def add_guarded_servicer(servicer: Any, server: grpc.aio.Server) -> None:
    """Like the generated add_CoordinatorServicer_to_server, but every call goes through
    `servicer.guard_call(method, incoming, context)` first, which returns the decoded request."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in SERVICE.methods:
        request_cls = GetMessageClass(method.input_type)
        response_cls = GetMessageClass(method.output_type)
        impl = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _stream(servicer, method.name, impl),
                request_deserializer=_decoder(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(servicer, method.name, impl),
                request_deserializer=_decoder(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))


def _unary(
    servicer: Any, name: str, impl: Callable[[Message, grpc.aio.ServicerContext], Awaitable[Message]]
) -> Callable[[Incoming, grpc.aio.ServicerContext], Awaitable[Message]]:
    async def handle(incoming: Incoming, context: grpc.aio.ServicerContext) -> Message:
        request = await servicer.guard_call(name, incoming, context)
        return await impl(request, context)

    return handle


def _stream(
    servicer: Any, name: str, impl: Callable[[Message, grpc.aio.ServicerContext], AsyncIterator[Message]]
) -> Callable[[Incoming, grpc.aio.ServicerContext], AsyncIterator[Message]]:
    async def handle(incoming: Incoming, context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
        request = await servicer.guard_call(name, incoming, context)
        async for item in impl(request, context):
            yield item

    return handle
