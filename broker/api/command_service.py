"""CommandService over gRPC: request -> `broker.core.commands.Commands` -> response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from broker.api.handlers import Handlers
from broker.core.commands import Caller, Commands
from broker.core.errors import BrokerError
from broker.security.auth import Authenticator, Principal
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t

SERVICE = svc.DESCRIPTOR.services_by_name["CommandService"].full_name


def caller(principal: Principal) -> Caller:
    return Caller(
        name=principal.actor,
        may_raise_lane=principal.has("admin"),
        reads_fleet=principal.has("read:fleet"),
        acts_fleet=principal.has("admin"),
        vehicles=principal.vehicles,
    )


class CommandService:
    def __init__(self, commands: Commands, auth: Authenticator) -> None:
        self._commands = commands
        self._auth = auth

    def handler(self, handlers: Handlers) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "SendCommand": handlers.unary(self.send_command, "send", svc.SendCommandRequest),
                "SendCommands": handlers.unary(self.send_commands, "send", svc.SendCommandsRequest),
                "GetCommand": handlers.unary(self.get_command, "read", svc.GetCommandRequest),
                "CancelCommand": handlers.unary(
                    self.cancel_command, "send", svc.CancelCommandRequest
                ),
                "ListCommands": handlers.unary(self.list_commands, "read", svc.ListCommandsRequest),
                "WatchCommands": handlers.server_stream(
                    self.watch_commands, "read", svc.WatchCommandsRequest
                ),
                "GetVehicleState": handlers.unary(
                    self.get_vehicle_state, "read", svc.GetVehicleStateRequest
                ),
            },
        )

    async def send_command(
        self, request: svc.SendCommandRequest, principal: Principal, deadline_s: float
    ) -> svc.SendCommandResponse:
        return await self._commands.send(request, caller(principal), deadline_s)

    async def send_commands(
        self, request: svc.SendCommandsRequest, principal: Principal, deadline_s: float
    ) -> svc.SendCommandsResponse:
        return await self._commands.send_batch(request, caller(principal), deadline_s)

    async def get_command(
        self, request: svc.GetCommandRequest, principal: Principal, deadline_s: float
    ) -> t.Command:
        return await self._commands.get(request.command_id, caller(principal))

    async def cancel_command(
        self, request: svc.CancelCommandRequest, principal: Principal, deadline_s: float
    ) -> t.Command:
        return await self._commands.cancel(request.command_id, caller(principal))

    async def list_commands(
        self, request: svc.ListCommandsRequest, principal: Principal, deadline_s: float
    ) -> svc.ListCommandsResponse:
        commands = await self._commands.list_commands(
            request.vehicle_id, request.limit, caller(principal)
        )
        return svc.ListCommandsResponse(commands=commands)

    async def watch_commands(
        self, request: svc.WatchCommandsRequest, principal: Principal
    ) -> AsyncIterator[t.Command]:
        # A watch lasts: it ends (UNAUTHENTICATED) when the caller's token expires or is
        # revoked, and the caller watches again with a fresh one.
        ended: asyncio.Future[BrokerError] = asyncio.get_running_loop().create_future()

        def end(error: BrokerError) -> None:
            if not ended.done():
                ended.set_result(error)

        hold = self._auth.hold(principal, end)
        try:
            async for command in self._commands.watch(
                list(request.vehicle_ids), list(request.command_ids), caller(principal), ended=ended
            ):
                yield command
        finally:
            hold.release()

    async def get_vehicle_state(
        self, request: svc.GetVehicleStateRequest, principal: Principal, deadline_s: float
    ) -> svc.VehicleState:
        return await self._commands.vehicle_state(request.vehicle_id, caller(principal))
