"""A first terrace model: layers made in forward, sizes inferred, errors caught."""

import torch
import torch.nn.functional as F

import terrace as ter


class MLP(ter.Module):
    def forward(self, x):
        self.start_forward()
        h = F.relu(self.make(ter.LazyLinear, 64)(x))
        h = self.make(ter.LazyLayerNorm)(h)
        return self.make(ter.LazyLinear, 10)(h)


def main() -> None:
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(32, 20)
    y = torch.randint(0, 10, (32,))
    print("output shape:", tuple(model(x).shape))
    print("slots:", [name for name, _ in model.named_children()])

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(50):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"loss after 50 steps: {loss.item():.4f}")


if __name__ == "__main__":
    main()
