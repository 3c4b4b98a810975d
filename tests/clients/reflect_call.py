#!/usr/bin/env python3
"""A grpcurl-like client: knows no .proto file, learns faultd's API by server reflection.

    reflect_call.py SOCKET list
    reflect_call.py SOCKET call faultd.v1.FaultService/Inject '{"ttl": "30s", ...}'

`call` prints the answer as proto3 JSON, or `ERROR <CODE> <message>` with exit status 1.
"""
import json
import sys

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> int:
    socket, verb = sys.argv[1], sys.argv[2]
    # A default channel, as users write it: grpc-core sends the %-encoded socket path as
    # :authority, which faultd accepts.
    channel = grpc.insecure_channel(f"unix:{socket}")
    database = ProtoReflectionDescriptorDatabase(channel)
    if verb == "list":
        for service in database.get_services():
            print(service)
        return 0
    method_path, body = sys.argv[3], sys.argv[4]
    service_name, method_name = method_path.split("/")
    pool = DescriptorPool(database)
    method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse(body, request_class())
    call = channel.unary_unary(
        f"/{service_name}/{method_name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    try:
        response = call(request, timeout=10)
    except grpc.RpcError as error:
        print(f"ERROR {error.code().name} {error.details()}")
        return 1
    print(json.dumps(json_format.MessageToDict(response)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
