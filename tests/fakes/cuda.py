"""A stand-in for cuda-python's CUDA runtime module (``cuda.bindings.runtime``, cuda-python 12.x;
``cuda.cudart`` before 12.6): the calls the TensorRT backend makes, on host memory.

Errors are returned as cuda-python returns them (``(cudaError_t, *values)`` tuples). Streams run
work at once; a stream being captured records it into a graph, which ``cudaGraphLaunch`` replays.
"""

from __future__ import annotations

import enum
import types


class FakeCuda(types.SimpleNamespace):
    """The cuda-python runtime calls the TensorRT backend (runtime/backends/tensorrt.py) makes."""

    def __init__(self):
        import ctypes

        class Err(enum.Enum):
            cudaSuccess = 0
            cudaErrorInvalidValue = 1

        class Kind(enum.Enum):
            cudaMemcpyHostToDevice = 1
            cudaMemcpyDeviceToHost = 2

        class Mode(enum.Enum):
            cudaStreamCaptureModeGlobal = 0
            cudaStreamCaptureModeThreadLocal = 1

        super().__init__(cudaError_t=Err, cudaMemcpyKind=Kind, cudaStreamCaptureMode=Mode, cudaStreamNonBlocking=1)
        self._ctypes = ctypes
        self.memory, self.capturing, self.graphs, self.next_stream = {}, {}, {}, 100
        self.launches = self.copies = 0

    def _alloc(self, size):
        buffer = (self._ctypes.c_byte * size)()
        address = self._ctypes.addressof(buffer)
        self.memory[address] = buffer
        return (self.cudaError_t.cudaSuccess, address)

    def cudaMalloc(self, size):
        return self._alloc(size)

    def cudaMallocHost(self, size):
        return self._alloc(size)

    def cudaFree(self, ptr):
        self.memory.pop(int(ptr), None)
        return (self.cudaError_t.cudaSuccess,)

    cudaFreeHost = cudaFree

    def cudaStreamCreateWithFlags(self, flags):
        self.next_stream += 1
        return (self.cudaError_t.cudaSuccess, self.next_stream)

    def cudaStreamDestroy(self, stream):
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        assert int(stream) not in self.capturing  # copies stay outside the graph
        self._ctypes.memmove(int(dst), int(src), int(count))
        self.copies += 1
        return (self.cudaError_t.cudaSuccess,)

    def cudaMemcpy(self, dst, src, count, kind):
        self._ctypes.memmove(int(dst), int(src), int(count))
        return (self.cudaError_t.cudaSuccess,)

    def enqueue(self, stream, work):
        if int(stream) in self.capturing:
            self.capturing[int(stream)].append(work)
        else:
            work()
        return True

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing[int(stream)] = []
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):
        self.next_graph = getattr(self, "next_graph", 0) + 1
        self.graphs[self.next_graph] = self.capturing.pop(int(stream))
        return (self.cudaError_t.cudaSuccess, self.next_graph)

    def cudaGraphInstantiate(self, graph, flags):
        return (self.cudaError_t.cudaSuccess, graph)

    def cudaGraphLaunch(self, graph_exec, stream):
        self.launches += 1
        for work in self.graphs[graph_exec]:
            work()
        return (self.cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, graph_exec):
        return (self.cudaError_t.cudaSuccess,)

    def cudaGraphDestroy(self, graph):
        self.graphs.pop(graph, None)
        return (self.cudaError_t.cudaSuccess,)


FAKE_CUDA = FakeCuda()
