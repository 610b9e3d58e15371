# A PyTorch training loop on the CPU for the tests, deterministic: a fixed
# seed, one thread, deterministic algorithms. Each step prints its loss to
# stdout and to a log of its own; the result is the trained parameters'
# sums. Any step computed differently, lost or repeated changes the output.
#
#   python3 train.py STEPS DELAY_S LOG
import sys
import time

import torch

steps, delay, logpath = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
torch.set_num_threads(1)
torch.set_num_interop_threads(1)
torch.use_deterministic_algorithms(True)
X = torch.randn(512, 32)
y = torch.tanh(X @ torch.randn(32, 1)) + 0.01 * torch.randn(512, 1)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
with open(logpath, "a") as log:
    for step in range(1, steps + 1):
        batch = torch.randint(0, 512, (64,))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X[batch]), y[batch])
        loss.backward()
        opt.step()
        line = f"step {step} loss {loss.item():.10f}"
        print(line, flush=True)
        print(line, file=log, flush=True)
        time.sleep(delay)
    line = "result " + " ".join(f"{p.sum().item():.10f}" for p in model.parameters())
    print(line, flush=True)
    print(line, file=log, flush=True)
