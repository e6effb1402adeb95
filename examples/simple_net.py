# The mission document's example, with only the import changed:
# `import torch.optim as optim` became `import rmsprop as optim`.
import torch
import torch.nn as nn
import rmsprop as optim

# Define a simple feedforward neural network
class SimpleNet(nn.Module):
    def __init__(self):
        super(SimpleNet, self).__init__()
        self.fc1 = nn.Linear(10, 50)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(50, 1)

    def forward(self, x):
        x = self.relu(self.fc1(x))
        x = self.fc2(x)
        return x

# Create model, loss function, and optimizer
model = SimpleNet()
criterion = nn.MSELoss()
optimizer = optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-08)

# Generate some dummy data
X = torch.randn(100, 10)
y = torch.randn(100, 1)

# Training loop
for epoch in range(10):
    optimizer.zero_grad()           # Clear gradients
    outputs = model(X)              # Forward propagation
    loss = criterion(outputs, y)    # Compute loss
    loss.backward()                 # Backpropagation
    optimizer.step()                # Update parameters

    print(f"Epoch [{epoch+1}/10], Loss: {loss.item():.4f}")
