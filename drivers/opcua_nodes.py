"""Resolving configured points and methods to the nodes of one connected OPC UA server.

Addresses are resolved at every connect, because NodeIds (and namespace indexes) may differ
between two starts of a server; a browse path from the Objects folder stays valid.

Address forms (``drivers.points``):

- NodeId text: ``ns=2;i=5``, ``ns=2;s=Temp``, ``i=2258``, or with a namespace URI instead of an
  index, ``nsu=urn:vendor:device;s=Temp``.
- Browse path elements, each a QualifiedName: ``2:Temperature`` (namespace index), or
  ``nsu=urn:vendor:device;Temperature`` (namespace URI, looked up in the server's
  NamespaceArray), or a bare ``Name`` (namespace 0). Paths start at the Objects folder and follow
  hierarchical references, so they work on any spec-following server.

All browse paths are translated in one TranslateBrowsePathsToNodeIds request and all DataTypes
read in one Read request; only a failure is looked at element by element, to name the element
that does not exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from asyncua import Client, ua
from asyncua.common.ua_utils import data_type_to_variant_type

from drivers.errors import ConfigurationError
from drivers.points import OpcUaMethod, OpcUaPoint


def ns0(identifier: int) -> ua.NodeId:
    """A numeric NodeId of the standard namespace 0."""
    return ua.NodeId(ua.Int32(identifier))


OBJECTS_FOLDER = ns0(ua.ObjectIds.ObjectsFolder)
_HIERARCHICAL = ns0(ua.ObjectIds.HierarchicalReferences)


@dataclass(frozen=True, slots=True)
class ResolvedPoint:
    """A point's node on the connected server and the builtin type its values are written as."""

    tag: str
    address: str
    node_id: ua.NodeId
    variant_type: ua.VariantType
    value_rank: int


@dataclass(frozen=True, slots=True)
class Argument:
    """One declared input argument of a method."""

    name: str
    variant_type: ua.VariantType
    value_rank: int


@dataclass(frozen=True, slots=True)
class ResolvedMethod:
    """A method, the object it is called on, and its declared input arguments."""

    name: str
    address: str
    object_id: ua.NodeId
    method_id: ua.NodeId
    inputs: tuple[Argument, ...]


def check_point(device: str, point: OpcUaPoint) -> None:
    """Raise ``ConfigurationError`` for a point whose address cannot work on any server."""
    if (point.node_id is None) == (point.browse_path is None):
        raise ConfigurationError(
            device, f"tag {point.tag!r}: set exactly one of node_id and browse_path"
        )
    _check_address(device, f"tag {point.tag!r}", point.node_id, point.browse_path)
    if point.sampling_interval_ms < 0 or point.deadband < 0:
        raise ConfigurationError(
            device, f"tag {point.tag!r}: sampling interval and deadband must not be negative"
        )


def check_method(device: str, method: OpcUaMethod) -> None:
    """Raise ``ConfigurationError`` for a method whose addresses cannot work on any server."""
    what = f"method {method.name!r}"
    for role, node_id, path in (
        ("object", method.object_node_id, method.object_browse_path),
        ("method", method.method_node_id, method.method_browse_path),
    ):
        if (node_id is None) == (path is None):
            raise ConfigurationError(
                device, f"{what}: set exactly one of {role}_node_id and {role}_browse_path"
            )
        _check_address(device, what, node_id, path)


def _check_address(device: str, what: str, node_id: str | None, path: Sequence[str] | None) -> None:
    try:
        if node_id is not None:
            ua.NodeId.from_string(node_id)
        for element in path or ():
            if not element.startswith("nsu="):
                ua.QualifiedName.from_string(element)
    except (ua.UaStringParsingError, ValueError) as exc:
        raise ConfigurationError(device, f"{what}: cannot parse address: {exc}") from exc
    if path is not None and not path:
        raise ConfigurationError(device, f"{what}: empty browse path")


def address_text(node_id: str | None, path: Sequence[str] | None) -> str:
    """A configured address as text for messages: the NodeId or ``/``-joined path."""
    return node_id if node_id is not None else "/".join(path or ())


class Resolver:
    """Resolves addresses on one connected client; caches DataType lookups."""

    def __init__(self, device: str, client: Client) -> None:
        self._device = device
        self._client = client
        self._namespaces: list[str] = []
        self._types: dict[ua.NodeId, ua.VariantType] = {}

    async def load_namespaces(self) -> None:
        """Read the server's NamespaceArray (needed for ``nsu=`` addresses)."""
        self._namespaces = list(await self._client.get_namespace_array())

    def _namespace_index(self, uri: str, what: str) -> int:
        try:
            return self._namespaces.index(uri)
        except ValueError:
            raise ConfigurationError(
                self._device, f"{what}: the server has no namespace {uri!r}"
            ) from None

    def node_id(self, text: str, what: str) -> ua.NodeId:
        """Parse NodeId text, mapping a namespace URI to this server's index."""
        return self.plain_id(ua.NodeId.from_string(text), what)

    def plain_id(self, node_id: ua.NodeId, what: str) -> ua.NodeId:
        """A plain NodeId of this server from a NodeId or an ExpandedNodeId."""
        index = node_id.NamespaceIndex
        if isinstance(node_id, ua.ExpandedNodeId) and node_id.NamespaceUri:
            index = ua.Int16(self._namespace_index(node_id.NamespaceUri, what))
        return ua.NodeId(node_id.Identifier, index, node_id.NodeIdType)

    def qualified_name(self, element: str, what: str) -> ua.QualifiedName:
        """Parse one browse path element (``2:Name``, ``nsu=URI;Name`` or ``Name``)."""
        if element.startswith("nsu="):
            uri, sep, name = element[4:].partition(";")
            if not sep or not name:
                raise ConfigurationError(
                    self._device, f"{what}: browse path element {element!r} is not nsu=URI;Name"
                )
            return ua.QualifiedName(name, self._namespace_index(uri, what))
        return ua.QualifiedName.from_string(element)

    async def translate(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[ua.NodeId]:
        """Resolve browse paths from Objects, one request for all; ``(what, path)`` pairs."""
        if not requests:
            return []
        names = [[self.qualified_name(e, what) for e in path] for what, path in requests]
        results = await self._client.translate_browsepaths(
            OBJECTS_FOLDER, [_relative_path(n) for n in names]
        )
        found: list[ua.NodeId] = []
        for (what, path), qnames, result in zip(requests, names, results, strict=True):
            if not result.StatusCode.is_good() or not result.Targets:
                await self._explain_missing(what, path, qnames, result.StatusCode)
            found.append(self.plain_id(result.Targets[0].TargetId, what))
        return found

    async def _explain_missing(
        self,
        what: str,
        path: Sequence[str],
        qnames: list[ua.QualifiedName],
        status: ua.StatusCode,
    ) -> None:
        prefixes = [_relative_path(qnames[: i + 1]) for i in range(len(qnames))]
        results = await self._client.translate_browsepaths(OBJECTS_FOLDER, prefixes)
        for i, result in enumerate(results):
            if not result.StatusCode.is_good() or not result.Targets:
                parent = "/".join(path[:i]) or "Objects"
                raise ConfigurationError(
                    self._device,
                    f"{what}: browse path {'/'.join(path)!r} fails at {path[i]!r}: "
                    f"no such child under {parent!r} ({result.StatusCode.name})",
                )
        raise ConfigurationError(
            self._device, f"{what}: browse path {'/'.join(path)!r} not found ({status.name})"
        )

    async def variant_type(self, data_type: ua.NodeId) -> ua.VariantType:
        """The builtin type values of ``data_type`` are encoded as (``Variant`` if abstract)."""
        if is_builtin_type(data_type):
            return ua.VariantType(int(data_type.Identifier))
        cached = self._types.get(data_type)
        if cached is None:
            cached = await data_type_to_variant_type(self._client.get_node(data_type))
            self._types[data_type] = cached
        return cached

    async def points(self, points: Sequence[OpcUaPoint]) -> dict[str, ResolvedPoint]:
        """Resolve every point, read its NodeClass, DataType and ValueRank."""
        ids = await self._node_ids([(f"tag {p.tag!r}", p.node_id, p.browse_path) for p in points])
        attrs = (ua.AttributeIds.NodeClass, ua.AttributeIds.DataType, ua.AttributeIds.ValueRank)
        values = await self.read_attributes(ids, attrs)
        resolved: dict[str, ResolvedPoint] = {}
        for i, (point, node_id) in enumerate(zip(points, ids, strict=True)):
            node_class, data_type, rank = values[i * 3 : i * 3 + 3]
            address = address_text(point.node_id, point.browse_path)
            what = f"tag {point.tag!r} at {address} ({node_id.to_string()})"
            if not node_class.StatusCode or not node_class.StatusCode.is_good():
                name = node_class.StatusCode.name if node_class.StatusCode else "no status"
                raise ConfigurationError(self._device, f"{what}: node does not exist ({name})")
            if _value(node_class) != ua.NodeClass.Variable:
                raise ConfigurationError(self._device, f"{what}: node is not a Variable")
            vtype = await self.variant_type(_value(data_type))
            resolved[point.tag] = ResolvedPoint(
                point.tag, address, node_id, vtype, int(_value(rank) or -1)
            )
        return resolved

    async def methods(self, methods: Sequence[OpcUaMethod]) -> dict[str, ResolvedMethod]:
        """Resolve every method and its object; read the method's InputArguments."""
        requests: list[tuple[str, str | None, Sequence[str] | None]] = []
        for m in methods:
            requests.append((f"method {m.name!r} object", m.object_node_id, m.object_browse_path))
            requests.append((f"method {m.name!r}", m.method_node_id, m.method_browse_path))
        ids = await self._node_ids(requests)
        resolved: dict[str, ResolvedMethod] = {}
        for i, method in enumerate(methods):
            object_id, method_id = ids[2 * i], ids[2 * i + 1]
            inputs = await self._input_arguments(method.name, method_id)
            address = address_text(method.method_node_id, method.method_browse_path)
            resolved[method.name] = ResolvedMethod(
                method.name, address, object_id, method_id, inputs
            )
        return resolved

    async def _input_arguments(self, name: str, method_id: ua.NodeId) -> tuple[Argument, ...]:
        path = ua.BrowsePath(
            StartingNode=method_id,
            RelativePath=_relative_path([ua.QualifiedName("InputArguments", 0)], property_=True),
        )
        result = (await self._client.uaclient.translate_browsepaths_to_nodeids([path]))[0]
        if not result.StatusCode.is_good() or not result.Targets:
            return ()  # a method without InputArguments takes no arguments
        node = self._client.get_node(self.plain_id(result.Targets[0].TargetId, name))
        dv = await node.read_attribute(ua.AttributeIds.Value, raise_on_bad_status=False)
        if dv.StatusCode is not None and not dv.StatusCode.is_good():
            raise ConfigurationError(
                self._device, f"method {name!r}: cannot read InputArguments ({dv.StatusCode.name})"
            )
        args: list[Argument] = []
        for arg in _value(dv) or []:
            vtype = await self.variant_type(arg.DataType)
            args.append(Argument(arg.Name or f"arg{len(args)}", vtype, int(arg.ValueRank)))
        return tuple(args)

    async def _node_ids(
        self, requests: Sequence[tuple[str, str | None, Sequence[str] | None]]
    ) -> list[ua.NodeId]:
        by_path = [(i, what, path) for i, (what, _, path) in enumerate(requests) if path]
        translated = await self.translate([(what, path) for _, what, path in by_path])
        from_path = {i: node_id for (i, _, _), node_id in zip(by_path, translated, strict=True)}
        return [
            self.node_id(text, what) if text is not None else from_path[i]
            for i, (what, text, _) in enumerate(requests)
        ]

    async def read_attributes(
        self, ids: Sequence[ua.NodeId], attrs: Sequence[ua.AttributeIds]
    ) -> list[ua.DataValue]:
        """Read ``attrs`` of every node in one Read request (node-major order)."""
        if not ids:
            return []
        params = ua.ReadParameters(TimestampsToReturn=ua.TimestampsToReturn.Neither)
        for node_id in ids:
            for attr in attrs:
                params.NodesToRead.append(ua.ReadValueId(NodeId=node_id, AttributeId=attr))
        return list(await self._client.uaclient.read(params))


def is_builtin_type(data_type: ua.NodeId) -> bool:
    """Whether ``data_type`` is one of the 25 builtin DataTypes (Boolean .. DiagnosticInfo)."""
    return (
        data_type.NamespaceIndex == 0
        and isinstance(data_type.Identifier, int)
        and 1 <= data_type.Identifier <= 25
    )


def _value(dv: ua.DataValue) -> Any:
    return dv.Value.Value if dv.Value is not None else None


def _relative_path(names: Sequence[ua.QualifiedName], property_: bool = False) -> ua.RelativePath:
    ref = ns0(ua.ObjectIds.HasProperty) if property_ else _HIERARCHICAL
    return ua.RelativePath(
        Elements=[
            ua.RelativePathElement(
                ReferenceTypeId=ref,
                IsInverse=False,  # type: ignore[arg-type]  # asyncua types it as ua.Boolean
                IncludeSubtypes=True,  # type: ignore[arg-type]
                TargetName=name,
            )
            for name in names
        ]
    )
