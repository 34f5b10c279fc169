# One process per node of a multi-node coop job, meeting the others the way
# torchrun's do: rank 0 listens on MASTER_ADDR:MASTER_PORT, every other rank
# connects, says hello and reads the answer. coop's agent on each node sets
# the variables (see the README, "Jobs larger than one machine"):
#
#   coop job submit --gpus 8 -- python3 "$PWD/examples/multinode/rendezvous.py" [SECONDS]
#
# With SECONDS, each rank then works (sleeps) that long before it exits.
import os, socket, sys, time
rank = int(os.environ["NODE_RANK"])
nodes = int(os.environ["NNODES"])
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
print("rank", rank, "of", nodes, "world", os.environ["WORLD_SIZE"],
      "local", os.environ["LOCAL_WORLD_SIZE"], "master", addr + ":" + str(port),
      "nodes", os.environ["COOP_NODES"], "torchrun", os.environ["PET_NNODES"],
      os.environ["PET_NODE_RANK"], "gpus", os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
if rank == 0:
    server = socket.create_server((addr, port))
    server.settimeout(60)
    for _ in range(nodes - 1):
        conn, _ = server.accept()
        print("rank 0 got:", conn.recv(1024).decode(), flush=True)
        conn.sendall(b"welcome from rank 0")
        conn.close()
else:
    deadline = time.time() + 60
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    conn.sendall(("hello from rank %d" % rank).encode())
    print("rank %d got:" % rank, conn.recv(1024).decode(), flush=True)
# What a training step would do once the ranks have met.
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
print("rank %d done" % rank, flush=True)
