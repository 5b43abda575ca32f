"""Walking a server's address space for the engineer's ``bedside devices browse ENDPOINT``.

``browse(endpoint, depth)`` yields one dict per node under the Objects folder, depth first,
following forward hierarchical references (so it works on any spec-following server)::

    {"path": "2:DeviceSet/2:CellProcessor", "node_id": "ns=2;i=3", "node_class": "Object",
     "data_type": None, "value": None, "quality": None, "access": None}
    {"path": ".../2:State", "node_id": "ns=2;i=9", "node_class": "Variable",
     "data_type": "String", "value": "idle", "quality": "good", "access": "r"}

``path`` is what an ``OpcUaPoint.browse_path`` takes (split on ``/``). The standard ``0:Server``
object is skipped unless ``include_server`` is set.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from asyncua import Client, ua

from drivers.errors import ConfigurationError, DeviceTimeout, DeviceUnavailable
from drivers.opcua_nodes import OBJECTS_FOLDER, is_builtin_type, ns0
from drivers.opcua_security import apply_security, check_security
from drivers.opcua_values import plain_value, quality_of
from drivers.points import SecurityConfig

BrowseRow = dict[str, str | int | float | bool | None]
_SERVER = ns0(ua.ObjectIds.Server)
_VARIABLE_ATTRS = (
    ua.AttributeIds.Value,
    ua.AttributeIds.DataType,
    ua.AttributeIds.UserAccessLevel,
)


async def browse(
    endpoint: str,
    depth: int = 3,
    *,
    security: SecurityConfig = SecurityConfig(),
    timeout: float = 4.0,  # noqa: ASYNC109 - the protocol stack's request timeout
    include_server: bool = False,
) -> AsyncIterator[BrowseRow]:
    """Yield the nodes under Objects down to ``depth`` levels (see the module docstring)."""
    device = endpoint
    check_security(device, security)
    client = Client(endpoint, timeout=timeout)
    try:
        await apply_security(device, client, security)
        await client.connect()
    except TimeoutError as exc:
        raise DeviceTimeout(device, f"no answer within {timeout} s") from exc
    except ua.UaStatusCodeError as exc:
        name = ua.StatusCode(exc.code).name
        raise DeviceUnavailable(device, f"connection refused: {name}") from exc
    except ua.UaError as exc:
        raise ConfigurationError(device, str(exc)) from exc
    except OSError as exc:
        raise DeviceUnavailable(device, f"cannot connect: {exc!r}") from exc
    try:
        walker = _Walker(client, include_server)
        async for row in walker.walk(OBJECTS_FOLDER, "", depth):
            yield row
    finally:
        await client.disconnect()


class _Walker:
    def __init__(self, client: Client, include_server: bool) -> None:
        self._client = client
        self._include_server = include_server
        self._type_names: dict[ua.NodeId, str] = {}

    async def walk(self, parent: ua.NodeId, prefix: str, depth: int) -> AsyncIterator[BrowseRow]:
        if depth <= 0:
            return
        children = [
            ref
            for ref in await self._children(parent)
            if self._include_server or ref.NodeId != _SERVER
        ]
        variables = [ref for ref in children if ref.NodeClass == ua.NodeClass.Variable]
        attrs = await self._read([ref.NodeId for ref in variables])
        for ref in children:
            path = f"{prefix}/{ref.BrowseName.to_string()}".lstrip("/")
            row: BrowseRow = {
                "path": path,
                "node_id": _plain(ref.NodeId).to_string(),
                "node_class": ua.NodeClass(ref.NodeClass).name,
                "data_type": None,
                "value": None,
                "quality": None,
                "access": None,
            }
            if ref.NodeClass == ua.NodeClass.Variable:
                value, data_type, access = attrs[_plain(ref.NodeId)]
                quality, status = quality_of(value.StatusCode)
                row.update(
                    data_type=await self._type_name(data_type),
                    value=plain_value(value.Value),
                    quality=quality.value,
                    access=_access(access),
                )
                if status:
                    row["status"] = status
            yield row
            if ref.NodeClass == ua.NodeClass.Object:
                async for sub in self.walk(_plain(ref.NodeId), path, depth - 1):
                    yield sub

    async def _children(self, node_id: ua.NodeId) -> list[ua.ReferenceDescription]:
        desc = ua.BrowseDescription(
            NodeId=node_id,
            BrowseDirection=ua.BrowseDirection.Forward,
            ReferenceTypeId=ns0(ua.ObjectIds.HierarchicalReferences),
            IncludeSubtypes=True,
            NodeClassMask=0,
            ResultMask=ua.BrowseResultMask.All,
        )
        params = ua.BrowseParameters(NodesToBrowse=[desc], RequestedMaxReferencesPerNode=0)
        result = (await self._client.uaclient.browse(params))[0]
        refs = list(result.References)
        while result.ContinuationPoint:
            more = ua.BrowseNextParameters(ContinuationPoints=[result.ContinuationPoint])
            result = (await self._client.uaclient.browse_next(more))[0]
            refs.extend(result.References)
        return refs

    async def _read(
        self, ids: list[ua.ExpandedNodeId]
    ) -> dict[ua.NodeId, tuple[ua.DataValue, ua.DataValue, ua.DataValue]]:
        if not ids:
            return {}
        params = ua.ReadParameters(TimestampsToReturn=ua.TimestampsToReturn.Neither)
        for node_id in ids:
            for attr in _VARIABLE_ATTRS:
                params.NodesToRead.append(ua.ReadValueId(NodeId=_plain(node_id), AttributeId=attr))
        values = await self._client.uaclient.read(params)
        return {
            _plain(node_id): (values[3 * i], values[3 * i + 1], values[3 * i + 2])
            for i, node_id in enumerate(ids)
        }

    async def _type_name(self, dv: ua.DataValue) -> str | None:
        data_type = dv.Value.Value if dv.Value is not None else None
        if not isinstance(data_type, ua.NodeId):
            return None
        if is_builtin_type(data_type):
            return ua.VariantType(int(data_type.Identifier)).name
        if data_type not in self._type_names:
            name = await self._client.get_node(data_type).read_browse_name()
            self._type_names[data_type] = name.Name or data_type.to_string()
        return self._type_names[data_type]


def _plain(node_id: ua.NodeId) -> ua.NodeId:
    return ua.NodeId(node_id.Identifier, node_id.NamespaceIndex, node_id.NodeIdType)


def _access(dv: ua.DataValue) -> str | None:
    level = dv.Value.Value if dv.Value is not None else None
    if not isinstance(level, int):
        return None
    readable = bool(level & (1 << ua.AccessLevel.CurrentRead))
    writable = bool(level & (1 << ua.AccessLevel.CurrentWrite))
    return ("r" if readable else "") + ("w" if writable else "") or "-"
