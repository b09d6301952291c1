"""Server reflection that serves our protos with their comments.

The generated Python modules carry descriptors without source info, so stock reflection would
show `grpcurl describe` users bare messages. poolsvc/gen/v1/descriptors.binpb holds the same
files with their comments; those are served in place of the stripped ones.
"""

from __future__ import annotations

from importlib import resources

from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer


def _documented_files() -> dict[str, bytes]:
    data = resources.files("poolsvc.gen.v1").joinpath("descriptors.binpb").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    return {f.name: f.SerializeToString() for f in files}


class DocumentedReflectionServicer(ReflectionServicer):
    def __init__(self, service_names):
        super().__init__(service_names)
        self._documented = _documented_files()

    def _respond_with_files(self, descriptor, request):
        seen: dict[str, object] = {}
        pending = [descriptor]
        while pending:  # the file and everything it imports, each once
            d = pending.pop()
            if d.name not in seen:
                seen[d.name] = d
                pending.extend(d.dependencies)
        blobs = []
        for name, d in seen.items():
            blob = self._documented.get(name)
            if blob is None:
                proto = descriptor_pb2.FileDescriptorProto()
                d.CopyToProto(proto)
                blob = proto.SerializeToString()
            blobs.append(blob)
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=blobs),
            original_request=request)

    def _file_by_filename(self, request, filename):
        try:
            return self._respond_with_files(self._pool.FindFileByName(filename), request)
        except KeyError:
            return super()._file_by_filename(request, filename)

    def _file_containing_symbol(self, request, fully_qualified_name):
        try:
            descriptor = self._pool.FindFileContainingSymbol(fully_qualified_name)
        except KeyError:
            return super()._file_containing_symbol(request, fully_qualified_name)
        return self._respond_with_files(descriptor, request)


def enable(server, service_names) -> None:
    servicer = DocumentedReflectionServicer((*service_names, reflection.SERVICE_NAME))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
